"""Checkpoints of a layer-wise run, so that an interrupted prune continues where it stopped.

A run with an output folder ``OUT`` keeps its work in ``OUT.partial/`` beside it (``OUT`` itself
appears only when the model is complete, by an atomic rename):

    state.json                  settings fingerprint, layer count, finished layers, input shapes
    allocation.json             ``--schedule auto``'s per-layer widths, written once chosen, so that a
                                resume does not redo its pass (an hour and more at 8B on a CPU)
    layer-00000.safetensors     layer 0 as cut (full tensor names) + its plan in the metadata
    ...
    inputs-00007/               the next layer's inputs: one raw file per calibration batch
    reference-00007/            ``--compensate asymmetric|drift``: the dense model's inputs to it, likewise

Each finished layer is committed in this order: its layer file (written by the layer store), the
next layer's inputs, then ``state.json`` by an atomic replace (the commit point), then the previous
inputs are deleted. A kill at any instant leaves a ``state.json`` whose files are all complete, and
``--resume`` restarts at the first unfinished layer with exactly the inputs an uninterrupted run
would have fed it, so the result is bitwise the same.

The settings that decide the result (method knobs, ratio, schedule, calibration windows, dtype,
device, batch size, model files) are recorded; ``--resume`` with different ones is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimgpt import distributed
from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError
from slimgpt.plan import LayerPlan

log = logging.getLogger(__name__)

FORMAT = 1
ALLOCATION = "allocation.json"
KILL_ENV = "SLIMGPT_TEST_KILL_AFTER_LAYER"  # test hook: SIGKILL this process after committing layer k
SIGNAL_ENV = "SLIMGPT_TEST_KILL_SIGNAL"  # ... or send it this signal instead (TERM: what schedulers send)
RANK_ENV = "SLIMGPT_TEST_KILL_RANK"  # ... only on this torchrun rank (default 0, the one that commits)
_NOT_SETTINGS = ("out", "overwrite", "resume", "max_memory", "offload_activations", "data_dir")


class StorageError(ConfigError):
    """Writing failed (disk full, permissions): the work folder is kept for ``--resume``."""


def storage_error(exc: OSError, where: str | Path, ckpt: Checkpoint | None = None) -> StorageError:
    """One line for an OSError while writing ``where``, with what to do next."""
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}.get(
        exc.errno or 0, exc.strerror or type(exc).__name__)
    if ckpt is not None and ckpt.folder.exists():
        hint = (f"free space (or fix permissions) and rerun the same command with --resume "
                f"({ckpt.done} of {ckpt.num_layers} layers are saved in {ckpt.folder})")
    else:
        hint = "free space (or fix permissions) or choose another --out, and run again"
    return StorageError(f"could not write {where}: {what}; {hint}")


def run_settings(cfg: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The resolved options that decide the pruned weights (not where things are written)."""
    s = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_SETTINGS}
    s["device"] = device.type
    s["dtype"] = str(dtype).removeprefix("torch.")
    if Path(str(cfg.schedule)).is_file():
        s["schedule_sha256"] = hashlib.sha256(Path(cfg.schedule).read_bytes()).hexdigest()
    return s


def data_identity(calib: torch.Tensor, model_folder: Path | None, model: nn.Module) -> dict[str, Any]:
    """Fingerprints of the calibration windows and of the source model (config and file sizes;
    hashing gigabytes of weights on every start would cost more than it protects)."""
    ident: dict[str, Any] = {"calibration_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()}
    if model_folder is not None and (model_folder / "config.json").is_file():
        ident["model_config_sha256"] = hashlib.sha256((model_folder / "config.json").read_bytes()).hexdigest()
        ident["model_files"] = {p.name: p.stat().st_size for p in sorted(model_folder.glob("*.safetensors"))}
    else:
        ident["model_config_sha256"] = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    return ident


# ---- activations as files ---------------------------------------------------------------------------


def write_tensors(folder: Path, tensors: list[torch.Tensor], sync: bool = True) -> list[dict[str, Any]]:
    """Write each tensor as one raw file in ``folder`` (replaced atomically); returns their specs."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = []
    for b, t in enumerate(tensors):
        t = t.detach().to("cpu").contiguous()
        with open(tmp / f"batch-{b:05d}.bin", "wb") as f:
            t.view(torch.uint8).numpy().tofile(f)  # no copy; view() keeps bf16/fp16 bit patterns
            if sync:
                f.flush()
                os.fsync(f.fileno())
        specs.append({"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return specs


def read_tensors(folder: Path, specs: list[dict[str, Any]], mmap: bool,
                 select: range | None = None) -> list[torch.Tensor]:
    """The tensors :func:`write_tensors` wrote (only those in ``select``, default all):
    memory-mapped (pages the kernel may drop, for activations that do not fit in memory) or
    copied into memory."""
    out = []
    for b in select if select is not None else range(len(specs)):
        spec = specs[b]
        n = math.prod(spec["shape"])
        t = torch.from_file(str(folder / f"batch-{b:05d}.bin"), shared=False, size=n,
                            dtype=getattr(torch, spec["dtype"])).view(spec["shape"])
        out.append(t if mmap else t.clone())
    return out


class ActivationFiles:
    """``--offload-activations DIR``: the inputs of the next layer live in memory-mapped files in
    ``DIR`` instead of anonymous memory, so the kernel can page them out; one set at a time
    (``name``: which stream, for a second set beside the first)."""

    def __init__(self, folder: str | Path, name: str = "inputs") -> None:
        self.root = Path(folder).expanduser().resolve()
        self.created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self.current: Path | None = None
        self.name = name

    def keep(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        folder = self.root / f"slimgpt-{self.name}-{os.getpid()}-{index:05d}"
        try:
            specs = write_tensors(folder, hidden, sync=False)
        except OSError as e:
            raise storage_error(e, folder) from e
        mapped = read_tensors(folder, specs, mmap=True)
        if self.current is not None and self.current != folder:
            shutil.rmtree(self.current, ignore_errors=True)  # still-mapped pages stay valid until unmapped
        self.current = folder
        return mapped

    def close(self) -> None:
        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
            self.current = None
        if self.created:
            try:
                self.root.rmdir()
            except OSError:
                pass


# ---- the checkpoint ---------------------------------------------------------------------------------


def kill_point(index: int) -> None:
    """Test hook: die here, after layer ``index`` is committed, when the environment asks (on rank
    ``SLIMGPT_TEST_KILL_RANK``, default 0)."""
    if os.environ.get(KILL_ENV) == str(index) and os.environ.get(RANK_ENV, "0") == str(distributed.rank()):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(SIGNAL_ENV, 'KILL')}"))


def _plan_dict(plan: LayerPlan) -> dict[str, Any]:
    return {"kept_heads": plan.kept_heads, "kept_channels": plan.kept_channels, "stats": plan.stats}


def _jsonable(o: Any) -> Any:
    return float(o) if hasattr(o, "__float__") else str(o)


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def layer_prefixes(adapter: ModelAdapter) -> list[str]:
    """Full tensor-name prefix of every decoder layer (``model.layers.3.``)."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return [names[id(layer)] + "." for layer in adapter.layers]


def set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` at ``name`` (relative to ``module``) as a parameter or buffer, replacing any
    tensor there, whatever its shape (layers are restored in their cut shapes)."""
    path, _, leaf = name.rpartition(".")
    mod = module.get_submodule(path) if path else module
    if leaf in mod._buffers:
        mod._buffers[leaf] = tensor
        return
    if isinstance(tensor, nn.Parameter):  # the very object (keeps ties such as embedding = head)
        mod._parameters[leaf] = tensor
        return
    old = mod._parameters.get(leaf)
    mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)


class Checkpoint:
    """The work folder of one run (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.folder = folder
        self.settings = settings
        self.state = state
        self.num_layers = state["num_layers"] if state else 0
        self._prefixes: list[str] | None = None

    @staticmethod
    def folder_for(out: str | Path) -> Path:
        out = Path(out).expanduser().resolve()
        return out.with_name(out.name + ".partial")

    @classmethod
    def open(cls, out: str | Path, settings: dict[str, Any], resume: bool, source: Path | None = None) -> Checkpoint:
        """The checkpoint for output ``out``: an existing one only with ``resume`` and the same
        settings (checked here, before the model is loaded); otherwise a fresh one, created on disk
        when the first layer is finished."""
        folder = cls.folder_for(out)
        if source is not None and (folder == source or folder.is_relative_to(source) or source.is_relative_to(folder)):
            raise ConfigError(f"the work folder {folder} would overlap the source model {source}; choose another --out")
        if folder.exists() and not (folder / "state.json").exists():
            ours = folder.is_dir() and all(
                re.fullmatch(r"(layer-\d+\.safetensors|(inputs|reference)-\d+|allocation\.json)(\.tmp)?|state\.json\.tmp",
                             p.name)
                for p in folder.iterdir())
            if not ours:
                raise ConfigError(f"{folder} exists and is not a slimgpt work folder; move it or choose another --out")
            if not (folder / ALLOCATION).is_file():
                shutil.rmtree(folder)  # stopped before its first commit: nothing finished to keep
            elif not resume:
                raise ConfigError(f"{folder} holds the --schedule auto allocation of an unfinished run for this --out; "
                                  "add --resume to continue it, or delete that folder to start over")
            else:  # the allocation is kept; the layers start again from 0
                for p in folder.iterdir():
                    if p.name != ALLOCATION:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                return cls(folder, dict(settings), None)
        if not folder.exists():
            if resume:
                log.info("nothing to resume in %s; starting from layer 0", folder)
            return cls(folder, dict(settings), None)
        if not resume:
            raise ConfigError(f"{folder} holds an unfinished run for this --out; add --resume to continue it, "
                              "or delete that folder to start over")
        try:
            state = json.loads((folder / "state.json").read_text())
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')}")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder} is not a usable slimgpt checkpoint ({e}); delete it and run again") from None
        ckpt = cls(folder, dict(settings), state)
        ckpt._compare(settings)
        return ckpt

    def _compare(self, settings: dict[str, Any]) -> None:
        assert self.state is not None
        old = dict(self.state["settings"])
        from dataclasses import fields

        from slimgpt.config import PruneConfig

        for f in fields(PruneConfig):  # an option added since the checkpoint was made: it ran with its default
            if f.name not in old and f.name in settings:
                old[f.name] = f.default
        diff = [f"{k}: {_short(old.get(k))} → {_short(v)}" for k, v in sorted(settings.items()) if old.get(k) != v]
        if diff:
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise ConfigError(f"cannot --resume {self.folder}: it was started with other settings "
                              f"({'; '.join(diff[:3])}{more}); rerun with the same options, or delete it to start over")

    def bind(self, data: dict[str, Any], adapter: ModelAdapter) -> None:
        """Second check, once the model and calibration windows exist: same data, same layers."""
        self.settings.update(data)
        self._prefixes = layer_prefixes(adapter)
        if self.state is None:
            self.num_layers = adapter.num_layers
            return
        self._compare(self.settings)
        if self.state["num_layers"] != adapter.num_layers:
            raise ConfigError(f"cannot --resume {self.folder}: it has {self.state['num_layers']} layers, the model "
                              f"{adapter.num_layers}; delete it to start over")
        missing = [i for i in range(self.done) if not self.layer_path(i).is_file()]
        if missing:
            raise ConfigError(f"{self.folder} lacks finished layer {missing[0]}; delete it and run again")

    def save_allocation(self, doc: dict[str, Any]) -> None:
        """Keep ``--schedule auto``'s choice (``doc``) with the settings it was made under (call
        after :meth:`bind`)."""
        path = self.folder / ALLOCATION
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({**doc, "run_settings": self.settings}, indent=1, default=_jsonable))
            os.replace(tmp, path)
        except OSError as e:
            raise storage_error(e, self.folder, self) from e

    def load_allocation(self) -> dict[str, Any] | None:
        """The allocation saved by this run under the same settings and data, else ``None``."""
        path = self.folder / ALLOCATION
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        saved = json.loads(json.dumps(self.settings, default=_jsonable))
        if doc.pop("run_settings", None) != saved:
            log.info("%s was chosen under other settings; choosing again", path)
            return None
        return doc

    @property
    def done(self) -> int:
        """Number of finished layers (layers ``0 .. done-1``)."""
        return self.state["done"] if self.state else 0

    def layer_path(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    # ---- writing ------------------------------------------------------------------------------
    def write_layer(self, index: int, layer: nn.Module, plan: LayerPlan) -> None:
        """Save finished (cut) layer ``index`` with full tensor names, and its plan."""
        assert self._prefixes is not None, "bind() first"
        prefix = self._prefixes[index]
        tensors = {prefix + n: t.detach().to("cpu").contiguous() for n, t in layer.state_dict().items()}
        meta = {"format": "pt", "slimgpt_plan": json.dumps(_plan_dict(plan), default=_jsonable)}
        path = self.layer_path(index)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise storage_error(e, path, self) from e

    def commit(self, index: int, plan: LayerPlan, hidden: list[torch.Tensor], save_inputs: bool = True,
               reference: list[torch.Tensor] | None = None) -> None:
        """Layer ``index`` is finished and its file written: record it (driver's ``on_layer_done``).
        ``reference``: the dense model's inputs to the next layer (asymmetric compensation), kept
        beside the pruned ones and committed with them.

        ``save_inputs=False`` (GPU runs, between costly input writes) records nothing: the state
        keeps pointing at the last saved inputs, and ``--resume`` redoes the layers after them
        (rewriting their files, to the same bits)."""
        if not self.layer_path(index).is_file():
            raise RuntimeError(f"checkpoint bug: layer {index} committed before its file was written")
        nxt = index + 1
        if not save_inputs and nxt < self.num_layers:
            kill_point(index)
            return
        state = {"format": FORMAT, "settings": self.settings, "num_layers": self.num_layers, "done": nxt,
                 "inputs": None}
        try:
            if nxt < self.num_layers:
                specs = write_tensors(self.folder / f"inputs-{nxt:05d}", hidden)
                state["inputs"] = {"folder": f"inputs-{nxt:05d}", "batches": specs}
                if reference is not None:
                    specs = write_tensors(self.folder / f"reference-{nxt:05d}", reference)
                    state["reference"] = {"folder": f"reference-{nxt:05d}", "batches": specs}
            tmp = self.folder / "state.json.tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps(state, indent=1, default=_jsonable))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / "state.json")
        except OSError as e:
            raise storage_error(e, self.folder, self) from e
        self.state = state
        shutil.rmtree(self.folder / f"inputs-{index:05d}", ignore_errors=True)
        shutil.rmtree(self.folder / f"reference-{index:05d}", ignore_errors=True)
        kill_point(index)

    # ---- reading ------------------------------------------------------------------------------
    def plan(self, index: int) -> LayerPlan:
        with safe_open(str(self.layer_path(index)), "pt") as f:
            d = json.loads(f.metadata()["slimgpt_plan"])
        return LayerPlan(d["kept_heads"], d["kept_channels"], d["stats"])

    def restore(self, adapter: ModelAdapter, materialize: bool) -> dict[int, LayerPlan]:
        """Put the finished layers back into the model as they were saved (cut to their plans):
        real tensors, or meta tensors of the right shapes for a streamed model."""
        from slimgpt.surgery import shrink_layer

        assert self._prefixes is not None, "bind() first"
        plans = {}
        for i in range(self.done):
            plans[i] = plan = self.plan(i)
            shrink_layer(adapter, i, plan)
            layer, prefix = adapter.layers[i], self._prefixes[i]
            expected = set(layer.state_dict())
            with safe_open(str(self.layer_path(i)), "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)  # backed by the file until copied
                    t = t.clone() if materialize else torch.empty_like(t, device="meta")
                    set_tensor(layer, key.removeprefix(prefix), t)
                    expected.discard(key.removeprefix(prefix))
            if expected:
                raise ConfigError(f"{self.layer_path(i)} lacks {sorted(expected)[0]}; delete {self.folder} and run again")
        return plans

    def load_inputs(self, mmap: bool = False) -> list[torch.Tensor]:
        """The inputs of the first unfinished layer, as the interrupted run computed them; under
        ``torchrun`` only this rank's batches (the checkpoint holds all, in batch order, so any
        number of processes can resume it)."""
        assert self.state is not None and self.state["inputs"] is not None
        return self._read_stream(self.state["inputs"], mmap)

    def load_reference(self, mmap: bool = False) -> list[torch.Tensor] | None:
        """The dense model's inputs to the first unfinished layer (asymmetric compensation), this
        rank's batches as :meth:`load_inputs`; None when the run kept no dense stream."""
        assert self.state is not None
        spec = self.state.get("reference")
        return self._read_stream(spec, mmap) if spec is not None else None

    def _read_stream(self, spec: dict[str, Any], mmap: bool) -> list[torch.Tensor]:
        select = distributed.batch_range(len(spec["batches"])) if distributed.is_distributed() else None
        return read_tensors(self.folder / spec["folder"], spec["batches"], mmap, select)

    # ---- end ----------------------------------------------------------------------------------
    def discard(self) -> None:
        """Forget the run (it failed in a way a resume would repeat)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.state = None

    def finish(self) -> None:
        """The output folder is in place: the work folder is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
