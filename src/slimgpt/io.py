"""Saving and loading pruned models.

A saved folder is an ordinary transformers checkpoint plus two things:

    config.json                 model_type slimgpt_llama / _qwen2 / _gemma3, per-layer size lists (and their
                                transformers per_layer_config mirror), auto_map → the two copied files below
    configuration_slimgpt.py    copies of slimgpt/modeling/*, so any process loads the folder with
    modeling_slimgpt.py         AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    model.safetensors           weights (no pickle); removed blocks are zero-sized tensors
                                (a streamed run writes model-0000k-of-0000N.safetensors + index)
    generation_config.json, tokenizer files
    slimgpt.json                the caller's metadata (method, ratios, calibration, ...)

Saving is atomic: everything is written into a temporary folder beside the target and renamed into
place at the end, so an interrupted run never leaves a half-written model where a good one was.

Weights are saved in the source checkpoint's precision by default (:func:`save_dtype`): a bf16 model
pruned in fp32 on a CPU is written back in bf16, not at twice the source's size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import slimgpt.modeling as slim_modeling
from slimgpt.errors import ConfigError, ModelError
from slimgpt.utils import DTYPES

FORMAT_VERSION = 1
_CODE_FILES = ("configuration_slimgpt.py", "modeling_slimgpt.py")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---- safetensors headers (read without loading a tensor) ---------------------------------------------
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if not 0 < n < 100 * 2**20:
        raise ValueError(f"{path.name}: bad safetensors header length")
    return n


def safetensors_header(path: Path) -> dict[str, Any]:
    n = header_length(path)
    with open(path, "rb") as f:
        f.seek(8)
        return json.loads(f.read(n))


def safetensors_data_bytes(path: Path) -> int:
    return path.stat().st_size - 8 - header_length(path)


def _float_dtypes(header: dict[str, Any]) -> dict[str, int]:
    """Bytes per floating safetensors dtype name (``F32``, ``BF16``, ``F8_E4M3``, ...) in a header."""
    sizes: dict[str, int] = {}
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"].startswith(("F", "BF")):
            sizes[entry["dtype"]] = sizes.get(entry["dtype"], 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return sizes


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype most of a folder's safetensors bytes are stored in (read from the file
    headers alone); ``None`` without safetensors files."""
    sizes: dict[torch.dtype, int] = {}
    for path in folder.glob("*.safetensors"):
        for name, n in _float_dtypes(safetensors_header(path)).items():
            if name in ("F32", "F16", "BF16"):
                sizes[ST_DTYPES[name]] = sizes.get(ST_DTYPES[name], 0) + n
    return max(sizes, key=sizes.__getitem__) if sizes else None


def source_dtype(name_or_path: str | Path | None) -> torch.dtype | None:
    """The floating dtype a model's weights are stored in: for a local folder its safetensors files'
    own, else what its config.json records (``dtype``, or transformers 4's ``torch_dtype``; a hub id
    too); ``None`` when it cannot be read."""
    if name_or_path is None:
        return None
    try:
        from slimgpt.zoo import resolve_model

        folder = Path(resolve_model(str(name_or_path)))  # a zoo name: its converted folder
        if folder.is_dir() and (stored := _stored_dtype(folder)) is not None:
            return stored
        if (folder / "config.json").is_file():
            cfg = json.loads((folder / "config.json").read_text())
        else:  # a hub id: its config alone (the weights were loaded already, so it is cached)
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(name_or_path)).to_dict()
    except Exception:  # noqa: BLE001 - no readable config: keep the run's dtype
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None


def save_dtype(name: str, source: torch.dtype | None, run: torch.dtype) -> torch.dtype | None:
    """The dtype to write the weights in, ``None`` for the run's own. ``auto``: the source's 16-bit
    dtype when the run computed in float32 (pruning in fp32 on a CPU must not double the size of
    a bf16 checkpoint), else the run's."""
    if name == "auto":
        return source if run == torch.float32 and source in (torch.bfloat16, torch.float16) else None
    if name not in DTYPES:
        raise ConfigError(f"unknown --save-dtype '{name}'; use auto, float32, float16 or bfloat16")
    return None if DTYPES[name] == run else DTYPES[name]


def cast_saved_weights(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the floating tensors of every safetensors file in ``folder`` as ``dtype``, one file at
    a time (a file that is a hard link, e.g. a streamed run's layer checkpoint, is replaced, never
    written through); the index's total size and config.json's ``dtype`` follow."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = next(k for k, v in ST_DTYPES.items() if v == dtype)
    size = 0
    for path in sorted(folder.glob("*.safetensors")):
        if set(_float_dtypes(safetensors_header(path))) <= {name}:  # nothing to cast (e.g. written in ``dtype``)
            size += safetensors_data_bytes(path)
            continue
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = path.with_name(path.name + ".cast")
        save_file(tensors, str(tmp), metadata=meta)
        del tensors
        os.replace(tmp, path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc.setdefault("metadata", {})["total_size"] = size
        index.write_text(json.dumps(doc, indent=2) + "\n")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_pruned(model: PreTrainedModel, tokenizer: Any, out_dir: str | Path, metadata: dict,
                overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a slim model from :func:`slimgpt.surgery.shrink_model`), ``tokenizer``
    (may be ``None``) and ``metadata`` to ``out_dir``, the weights in ``dtype`` (default: the
    model's); returns the absolute folder path. The model itself is left as it is."""
    model_type = model.config.model_type
    if model_type not in slim_modeling.SLIM_MODEL_TYPES:
        raise ModelError(f"save_pruned expects a shrunk model, got model_type '{model_type}'; "
                         "pass it through slimgpt.surgery.shrink_model first")
    return write_pruned_folder(out_dir, model.config, type(model).__name__, model.save_pretrained, tokenizer,
                               metadata, overwrite, _source_folder(model.config), dtype)


def write_pruned_folder(out_dir: str | Path, config: Any, model_class: str, write_weights: Callable[[Path], None],
                        tokenizer: Any, metadata: dict, overwrite: bool = False,
                        source: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """The atomic folder writer behind :func:`save_pruned`, for callers that write the weights
    themselves (:mod:`slimgpt.streaming` writes safetensors shards layer by layer): ``write_weights``
    gets the temporary folder and must write config.json and the weights into it; ``source`` is
    the model folder that must not be overwritten; ``dtype``, when given, is what the weights are
    rewritten in before the folder is moved into place."""
    out = Path(out_dir).expanduser().resolve()
    _check_target(out, source, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp is owner-only; a saved model is meant to be shared
    try:
        config.auto_map = {
            "AutoConfig": f"configuration_slimgpt.{type(config).__name__}",
            "AutoModel": f"modeling_slimgpt.{slim_modeling.DECODER_CLASSES[model_class]}",  # vLLM's Transformers backend
            "AutoModelForCausalLM": f"modeling_slimgpt.{model_class}",
        }
        write_weights(tmp)
        if dtype is not None:
            cast_saved_weights(tmp, dtype)
        for name in _CODE_FILES:
            shutil.copy2(Path(slim_modeling.__file__).parent / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"format_version": FORMAT_VERSION, **metadata}
        (tmp / "slimgpt.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        for f in tmp.iterdir():  # safetensors writes owner-only files; a saved model is meant to be shared
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pruned(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> tuple[PreTrainedModel, Any]:
    """Load a folder written by :func:`save_pruned` (or any causal-LM checkpoint) in eval mode;
    the tokenizer is ``None`` when the folder has none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} not found")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; point at a folder written by save_pruned")
    slim_modeling.register()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    model.to(device).eval()
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return model, tokenizer


def saved_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, whatever its sharding (for comparing two saved runs)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _source_folder(config: Any) -> Path | None:
    name = getattr(config, "_name_or_path", "") or ""
    path = Path(name).expanduser()
    return path.resolve() if name and path.is_dir() else None


def _check_target(out: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse targets that would overwrite a result, or the model being pruned, by accident."""
    if source is not None:
        if out == source or out.is_relative_to(source):
            raise ConfigError(f"output folder {out} is inside the source model folder {source}; choose another")
        if overwrite and out.exists() and source.is_relative_to(out):
            raise ConfigError(f"overwriting {out} would delete the source model folder {source}; choose another")
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} exists; pass --overwrite or choose another")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; choose another")


def replace_path(new: Path, out: Path) -> None:
    """Rename ``new`` (a folder or a file) onto ``out``; an existing ``out`` is moved aside first,
    deleted only after the new one is in place, and restored if the rename fails."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path, overwrite: bool = False, folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (a fresh folder, or a file name when ``folder`` is
    False); on success it replaces ``target`` (the old one is deleted only after the rename), on
    error it is removed. Refuses an existing ``target`` unless ``overwrite``."""
    out = Path(target).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite or choose another")
    if out.exists() and out.is_dir() != folder:
        kind = "a folder" if out.is_dir() else "a file"
        raise ConfigError(f"output {out} exists and is {kind}; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; an export is meant to be shared
    work = tmp if folder else tmp / out.name
    try:
        yield work
        for f in [work, *work.rglob("*")] if work.is_dir() else [work]:
            if f.is_file() and not f.is_symlink():  # safetensors writes 0600; an export is meant to be shared
                f.chmod(0o666 & ~umask)
        replace_path(work, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
