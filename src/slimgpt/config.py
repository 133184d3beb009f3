"""Every knob of a pruning run, validated before any long work starts.

The resolved config is written as JSON beside the saved model, so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimgpt.defaults import CPU_NSAMPLES, CPU_SEQLEN, DEFAULT_MODEL, GPU_NSAMPLES, GPU_SEQLEN
from slimgpt.errors import ConfigError
from slimgpt.schedule import SCHEDULES

if TYPE_CHECKING:  # torch is imported by whoever runs the config, not by argument parsing
    import torch

__all__ = ["CPU_NSAMPLES", "CPU_SEQLEN", "DEFAULT_MODEL", "GPU_NSAMPLES", "GPU_SEQLEN", "PruneConfig"]


COMPENSATIONS = ("symmetric", "asymmetric", "drift")  # slimgpt.driver.COMPENSATIONS, without importing torch
UNTARGETED = ("flap",)  # methods that cannot stay inside an engine's shapes (refused with --target)


@dataclass
class PruneConfig:
    model: str = DEFAULT_MODEL
    out: str | None = None
    method: str = "slimgpt"
    ratio: float = 0.2
    schedule: str = "auto"  # log: the paper's Incremental Pruning Ratio
    first_ratio: float | None = None
    calib: str = "c4"
    nsamples: int | None = None
    seqlen: int | None = None
    batch_size: int = 8
    damp: float = 0.01
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "auto"  # weights on disk (auto: the source's 16-bit dtype when the run is fp32)
    head_score: str = "gcd"
    ffn_groups: str = "dynamic"
    min_group: int = 8
    max_group: int = 1024
    propagate: str = "pruned"
    data_dir: str | None = None
    overwrite: bool = False
    blocks: int | None = None  # blockpruner / shortgpt: remove this many blocks instead of --ratio
    depth_share: float = 0.5  # slimgpt+blockpruner: share of the removed parameters taken by whole blocks
    search_dtype: str = "auto"  # blockpruner search precision (auto: bf16 on CPUs with native bf16)
    search_nsamples: int | None = None  # blockpruner: score candidates on the first N calibration windows
    resume: bool = False  # continue the unfinished run checkpointed in OUT.partial/
    max_memory: str | None = None  # e.g. "4GiB": stream layers from disk when the model would not fit
    offload_activations: str | None = None  # folder for memory-mapped calibration activations
    # --schedule search (slimgpt.search.options.FIELDS holds the help texts)
    search_budget: str = "25m"
    search_generations: int = 1000
    search_offspring: int = 16
    search_tokens: str = "512,2048,8192"
    search_survivors: str = "4,1"
    search_levels: int = 10
    search_ffn_step: int = 0  # 0: --search-levels; N: the earlier full ladders (every N channels)
    search_final: str = "rerun"
    target: str = "any"  # serving engine whose shapes every allocation stays inside (slimgpt.serving)
    compensate: str = "symmetric"  # symmetric (the paper) | asymmetric | drift: toward the dense model's outputs
    shrink: str = "heldout"  # asymmetric|drift: share of the correction (heldout: chosen per linear; or a number)

    def resolved(self, device: torch.device) -> PruneConfig:
        """Fill the device-dependent defaults (calibration size)."""
        c = PruneConfig(**asdict(self))
        gpu = device.type == "cuda"
        c.nsamples = c.nsamples or (GPU_NSAMPLES if gpu else CPU_NSAMPLES)
        c.seqlen = c.seqlen or (GPU_SEQLEN if gpu else CPU_SEQLEN)
        return c

    def validate(self) -> None:
        """Cheap checks that must fail before a model is loaded (one line each)."""
        if not isinstance(self.ratio, int | float) or not 0 < self.ratio < 1:
            raise ConfigError(f"--ratio must be a number in (0, 1), the share of all parameters removed; got {self.ratio}")
        if self.first_ratio is not None and not 0 <= self.first_ratio < 1:
            raise ConfigError(f"--first-ratio must be in [0, 1); got {self.first_ratio}")
        if self.schedule not in SCHEDULES and not Path(self.schedule).is_file():
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)} or an existing file; got '{self.schedule}'")
        self._validate_target()
        if self.head_score not in ("gcd", "gcd-exact", "initial"):
            raise ConfigError(f"--head-score must be gcd, gcd-exact or initial; got '{self.head_score}'")
        if self.ffn_groups != "dynamic" and not (str(self.ffn_groups).isdigit() and int(self.ffn_groups) > 0):
            raise ConfigError(f"--ffn-groups must be 'dynamic' or a positive integer; got '{self.ffn_groups}'")
        from slimgpt.search.options import validate_allocation

        validate_allocation(self)

        for name in ("nsamples", "seqlen", "batch_size", "min_group", "max_group", "search_nsamples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {v}")
        if self.damp < 0:
            raise ConfigError(f"--damp must be >= 0; got {self.damp}")
        if self.propagate not in ("pruned", "original"):
            raise ConfigError("--propagate must be 'pruned' or 'original'")
        self._validate_compensate()
        if self.blocks is not None and (self.blocks <= 0 or self.method not in ("blockpruner", "shortgpt")):
            raise ConfigError(f"--blocks must be positive and needs --method blockpruner or shortgpt; got {self.blocks} with {self.method}")
        if not 0 <= self.depth_share <= 1:
            raise ConfigError(f"--depth-share must be within [0, 1]; got {self.depth_share}")
        if self.max_memory is not None:
            from slimgpt.utils import parse_size

            parse_size(self.max_memory)  # ConfigError when unreadable
        if self.offload_activations is not None and Path(self.offload_activations).is_file():
            raise ConfigError(f"--offload-activations {self.offload_activations} is a file; give a folder")
        if self.out is not None:
            out = Path(self.out).resolve()
            if out.exists() and not self.overwrite:
                raise ConfigError(f"output folder {self.out} exists; pass --overwrite or choose another")
            src = Path(self.model)
            if src.is_dir():
                src = src.resolve()
                if out == src or src in out.parents:
                    raise ConfigError(f"output folder {self.out} is inside the source model folder; choose another")
            from slimgpt.preflight import check_writable

            check_writable(self.out, "output folder")  # before the model is loaded, not when saving
        # last: the method registry imports torch (seconds), the checks above answer a typo at once
        from slimgpt.methods import METHODS
        from slimgpt.twin import SEARCH_DTYPES
        from slimgpt.utils import DTYPES

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.save_dtype != "auto" and self.save_dtype not in DTYPES:
            raise ConfigError(f"unknown --save-dtype '{self.save_dtype}'; use auto, float32, float16 or bfloat16")
        if self.search_dtype not in SEARCH_DTYPES:
            raise ConfigError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}; got '{self.search_dtype}'")

    def _validate_target(self) -> None:
        from slimgpt.serving import TARGETS

        if self.target not in TARGETS:
            raise ConfigError(f"--target must be one of {', '.join(TARGETS)}; got '{self.target}'")
        if self.target != "any" and self.method in UNTARGETED:
            raise ConfigError(f"--method {self.method} chooses its widths by its own global threshold, outside any "
                              f"engine's shapes; use --method slimgpt (or wanda-sp, magnitude) with --target {self.target}, "
                              "or drop --target")

    def check_model(self, ffn_widths: list[int], family: str | None = None, sliding: bool = False) -> None:
        """The ``--target`` checks that need the model (its FFN widths, its family and whether it has
        sliding-window layers), before any long work: a route that can express it, and under SGLang
        dense FFN widths in multiples of 256 where the allocation may keep one (whole-block methods,
        the searched ladders; the schedules prune every FFN to a multiple themselves)."""
        if self.target == "any":
            return
        from slimgpt.schedule import target_constraint
        from slimgpt.serving import SGLANG_FFN_UNIT

        whole_blocks = self.method in ("blockpruner", "shortgpt", "slimgpt+blockpruner")
        target_constraint(self.target, family, sliding, prefer="deci" if whole_blocks else None)
        if self.method == "shortgpt" and target_constraint(self.target, family, sliding, prefer="deci").keep_attention:
            raise ConfigError(f"--method shortgpt removes whole layers, attention included, which --target {self.target} "
                              "serves only through its DeciLM route, and this model has none; use --method blockpruner")
        schedules = self.method in ("slimgpt", "magnitude", "wanda-sp") and self.schedule != "search"
        odd = sorted({w for w in ffn_widths if w % SGLANG_FFN_UNIT})
        if self.target == "sglang" and odd and not schedules:
            how = "--schedule search" if self.method == "slimgpt" else f"--method {self.method}"
            raise ConfigError(f"--target sglang serves FFN widths in multiples of {SGLANG_FFN_UNIT}, and {how} keeps some "
                              f"FFNs at the model's {odd[0]}; use --method slimgpt with --schedule auto or log, which "
                              "prune every FFN to a multiple")

    def _validate_compensate(self) -> None:
        """``--compensate``: a known value, and a method whose weights are solved toward a target."""
        if self.compensate not in COMPENSATIONS:
            raise ConfigError(f"--compensate must be one of {', '.join(COMPENSATIONS)}; got '{self.compensate}'")
        if self.shrink != "heldout":
            try:
                share = float(self.shrink)
            except ValueError:
                share = math.nan
            if not 0 <= share <= 1:
                raise ConfigError(f"--shrink must be 'heldout' or a number in [0, 1] (the share of the correction "
                                  f"toward the dense model kept); got '{self.shrink}'")
            if self.compensate == "symmetric":
                raise ConfigError("--shrink scales --compensate asymmetric|drift's correction; add --compensate "
                                  "asymmetric or drop --shrink")
        if self.compensate == "symmetric":
            return
        if self.method not in ("slimgpt", "slimgpt+blockpruner"):
            raise ConfigError(f"--compensate {self.compensate} re-solves SlimGPT's compensated weights; --method "
                              f"{self.method} has none: use --method slimgpt or slimgpt+blockpruner, or drop --compensate")
        if self.schedule == "search" and self.search_final != "rerun":
            raise ConfigError(f"--compensate {self.compensate} acts in the final layer-wise pass; --search-final "
                              f"{self.search_final} keeps the database's dense-input solutions: use --search-final rerun")

    def to_dict(self) -> dict:
        return asdict(self)
