"""Small shared helpers: device/dtype parsing, peak-memory measurement, seeding."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from slimgpt.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device '{name}'; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half-precision matmuls are slow there); on CUDA bfloat16 where the
    GPU has it (Ampere and later), else float16. bf16 has float32's range: Gemma and Qwen2.5 were
    trained in it and their activations overflow float16's 65504."""
    if name in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype '{name}'; use auto, float32, float16 or bfloat16")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak memory over a region: resident memory sampled every 20 ms on CPU (ru_maxrss
    cannot be reset, so it would include model loading), allocator peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes())
            time.sleep(0.02)

    @contextmanager
    def track(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_rss = rss_bytes()
        t = threading.Thread(target=self._poll, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self._stop.set()
            t.join()
            self.peak_rss = max(self.peak_rss, rss_bytes())
            if self.device.type == "cuda":
                self.peak_cuda = torch.cuda.max_memory_allocated(self.device)

    def as_dict(self) -> dict[str, float]:
        d = {"peak_rss_mib": self.peak_rss / 2**20,
             "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            d["peak_cuda_mib"] = self.peak_cuda / 2**20
        return d


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (the asset wheels'
    imports pull dependencies that are not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``4GiB``, ``512MiB``, ``8G`` (binary), ``8GB`` (decimal) or plain bytes → bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-memory must be a positive size like 4GiB, 512MiB or 8e9 (bytes); got '{text}'")
    return int(float(m.group(1)) * _UNITS[unit])
