"""The level database: every (unit, level) variant pruned once with SlimGPT's OBS solvers.

**Dense inputs.** Variants are built from the *dense* model's inputs (EvoPress's choice): one pass
over the calibration windows collects, per layer, the Hessian of ``o_proj``'s input and of
``down_proj``'s input (after the dense attention), so every variant is independent of the others
and the search may combine them freely. Whether the final model stitches these variants or re-runs
sequential SlimGPT (propagated inputs) at the found widths is ``--search-final``.

**Attention** levels are pruned independently with :func:`~slimgpt.solvers.heads.prune_heads`
(batched greedy, GQA-aware, ``--head-score``); where two shapes remove the same parameters the one
with the lower OBS error is kept. **FFN** levels come from one greedy OBS path per layer removing
``g`` channels per step with compensation (``prune_channels`` with a fixed group of ``g``, the
'-DGS' variant, which is *nested*: the path's state after ``k`` steps equals a fresh prune of ``k·g``
channels, so one pass yields every level; ``g`` = 64 on every model with ``F >= 1,280``). The top
level of either kind removes the block and stores nothing.

**Storage.** A variant is its kept indices (int32) and the compensated ``o_proj`` / ``down_proj``
columns of what it keeps *in the model's dtype* (the stitcher casts to it anyway, so nothing is
lost), one ``torch.save`` file per variant in a folder, read back memory-mapped. Levels are
``--search-levels`` points per sub-layer (:func:`~slimgpt.search.levels.ladders`), so the folder
holds about ``(levels - 1)/2`` copies of every layer's ``o_proj`` and ``down_proj``:
:func:`slimgpt.search.size.estimate_database_bytes` gives it without building it. No Hessian is
kept: each layer's are freed once its variants are written; the one a stitched fix-up needs is
recomputed by :func:`dense_mlp_hessian`. The folder has an ``index.json`` with a fingerprint, so
a resumed run reuses a finished database.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slimgpt.arch.base import ModelAdapter
from slimgpt.runner import LayerRunner, Timer, embed_batches
from slimgpt.schedule import LayerSpace
from slimgpt.search.levels import ffn_channels, ladders
from slimgpt.serving import Constraint
from slimgpt.solvers.heads import HeadScore, prune_heads
from slimgpt.solvers.hessian import damped_inverse
from slimgpt.solvers.obs import column_errors, remove_columns

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """Kept query heads or channels (sorted) and the compensated output-projection columns."""

    kept: list[int]
    weight: torch.Tensor  # (rows, kept·head_dim) for attention, (rows, kept) for the FFN
    error: float


def ffn_path(W: torch.Tensor, Hinv: torch.Tensor, counts: list[int], keep: set[int] | None = None,
             ) -> list[tuple[list[int], torch.Tensor, float]]:
    """Greedy OBS removal of ``down_proj`` columns (``W`` and ``Hinv`` are consumed: edited in
    place, then replaced by compact copies), one joint group per step down ``counts`` (kept
    channels, descending); the state at each count after the first (only at the counts in ``keep``
    when given: the grid is finer than the levels).

    A removed column's ``Hinv`` row and column and its ``W`` column are exactly zero after
    :func:`remove_columns`, so they take no part in later steps: once a quarter of the current
    columns are gone the matrices are cut down to the live ones, and each step costs the live
    width squared, not ``F²`` (about 2.5× less down to the 10 % level)."""
    cols = torch.arange(W.shape[1], device=W.device)  # original index of each current column
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    out: list[tuple[list[int], torch.Tensor, float]] = []
    err = 0.0
    for prev, c in zip(counts, counts[1:]):
        g = int(alive.sum()) - c
        if g < 0 or prev - c != g:
            raise ValueError("counts must follow the current width down")
        scores = column_errors(W, Hinv)
        scores[~alive] = torch.inf
        idx = torch.topk(scores, g, largest=False).indices
        err += remove_columns(W, Hinv, idx)
        alive[idx] = False
        live = torch.nonzero(alive).flatten()
        if keep is None or c in keep:
            out.append((cols[live].tolist(), W[:, live].clone(), err))
        if 0 < live.numel() <= 0.75 * alive.numel():
            W, Hinv, cols = W[:, live], Hinv[live][:, live], cols[live]
            alive = torch.ones(live.numel(), dtype=torch.bool, device=W.device)
    return out


def ffn_variant_at(W: torch.Tensor, H: torch.Tensor, channels: int, step: int, damp: float) -> Variant:
    """The FFN variant at any width: the ladder path down to the nearest ladder point above
    ``channels``, then one more joint group (so ladder widths reproduce the database exactly)."""
    C = W.shape[1]
    counts = [c for c in ffn_channels_from(C, step) if c > channels] + [channels]
    if channels == C:
        return Variant(list(range(C)), W.clone(), 0.0)
    Hinv, _ = damped_inverse(H, damp)
    kept, w, err = ffn_path(W.float().clone(), Hinv, counts, keep={channels})[-1]
    return Variant(kept, w, err)


def ffn_channels_from(C: int, step: int) -> list[int]:
    return [*range(C, 0, -step), 0]


class LevelDatabase:
    """Variants on disk; ``attn_shapes[i]`` / ``ffn_levels[i]`` name each level of layer ``i``,
    ``ffn_group[i]`` is the step of its FFN path (what :func:`ffn_variant_at` continues)."""

    def __init__(self, folder: Path, index: dict[str, Any]) -> None:
        self.folder, self.index = folder, index
        self.attn_shapes: list[list[tuple[int, int]]] = [[tuple(x) for x in a] for a in index["attn_shapes"]]
        self.attn_removed: list[list[int]] = index["attn_removed"]
        self.ffn_levels: list[list[int]] = index["ffn_levels"]
        self.ffn_group: list[int] = index.get("ffn_group") or [index["ffn_step"]] * len(self.ffn_levels)
        self.errors: dict[str, list[list[float]]] = index["errors"]  # "attn"/"ffn" → [layer][level]
        self.input_norms: list[list[float]] = index["input_norms"]  # [layer] → [attn in, mlp in] mean ||x||²
        self.seconds: dict[str, float] = index.get("seconds", {})
        self._cache: dict[tuple[str, int, int], Variant | None] = {}  # memory-mapped, so cheap to hold

    def path(self, kind: str, layer: int, level: int) -> Path:
        return self.folder / f"{kind}_{layer:03d}_{level:03d}.pt"

    def variant(self, kind: str, layer: int, level: int) -> Variant | None:
        """The stored variant; ``None`` for level 0 (dense) and the top level (block removed)."""
        k = (kind, layer, level)
        if k not in self._cache:
            p = self.path(kind, layer, level)
            d = torch.load(p, mmap=True, weights_only=True) if p.exists() else None
            self._cache[k] = None if d is None else Variant(d["kept"].tolist(), d["weight"], float(d["error"]))
        return self._cache[k]

    def bytes_on_disk(self) -> int:
        """Bytes of the variant files (``index.json`` aside)."""
        return sum(p.stat().st_size for p in self.folder.glob("*.pt"))

    @staticmethod
    def open(folder: Path, key: dict[str, Any]) -> LevelDatabase | None:
        """A finished database built with ``key``, or ``None``."""
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError):
            return None
        if index.get("key") != json.loads(json.dumps(key, default=str)) or not index.get("complete"):
            return None
        return LevelDatabase(folder, index)


def _energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """``trace(W H Wᵀ)``: the OBS error of removing every column (the whole block), no compensation."""
    Wf = W.float()
    return float(((Wf @ H.float()) * Wf).sum())


def _dense_layers(adapter: ModelAdapter, calib: torch.Tensor, device: torch.device, batch_size: int,
                  timer: Timer, progress: bool = False, desc: str = "") -> Iterator[tuple[int, LayerRunner]]:
    """Every layer with its dense inputs, in order (the dense propagation; a consumer that stops
    early leaves the model where it was)."""
    dtype = next(adapter.model.parameters()).dtype
    ctx = adapter.context(calib.shape[1], device, dtype)
    with timer("forward"):
        hidden = embed_batches(adapter, calib, batch_size, torch.device("cpu"))
    for i in tqdm(range(adapter.num_layers), desc=desc, disable=not progress):
        layer = adapter.layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        try:
            run = LayerRunner(i, layer, adapter, hidden, ctx, device, timer)
            yield i, run
            outs = run.dense_outputs if run.dense_outputs is not None else run.outputs()  # the consumer's pass, or one now
            hidden = [o_.to("cpu") for o_ in outs]  # dense propagation: the next layer's inputs
            del run
        finally:
            layer.to(home)


@torch.no_grad()
def dense_mlp_hessian(adapter: ModelAdapter, calib: torch.Tensor, device: torch.device, layer: int,
                      batch_size: int = 8, timer: Timer | None = None) -> torch.Tensor:
    """``down_proj``'s input Hessian of ``layer`` from the dense model's inputs, as the database
    build computed it (the same adapter, the same batches and the same pass, so the same values):
    the stitched fix-up's one Hessian, recomputed instead of keeping every layer's ``F x F``
    matrix on disk. Give the adapter the database was built with (``forward``)."""
    with closing(_dense_layers(adapter, calib, device, batch_size, timer or Timer(device))) as layers:
        for i, run in layers:
            if i == layer:
                return run.dense_pass().mlp_hessian
    raise IndexError(f"no layer {layer}")


def _save(path: Path, kept: list[int], weight: torch.Tensor, error: float, dtype: torch.dtype) -> None:
    torch.save({"kept": torch.tensor(kept, dtype=torch.int32), "weight": weight.to(dtype).contiguous().cpu(),
                "error": torch.tensor(error, dtype=torch.float32)}, path)


@torch.no_grad()
def build_database(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    spaces: list[LayerSpace],
    device: torch.device,
    folder: Path,
    key: dict[str, Any],
    *,
    levels: int | None = None,
    ffn_step: int | None = None,
    damp: float = 0.01,
    head_score: HeadScore = "gcd",
    batch_size: int = 8,
    timer: Timer | None = None,
    progress: bool = True,
    forward: ModelAdapter | None = None,
    constraint: Constraint | None = None,
) -> LevelDatabase:
    """Build (or reuse, when ``folder`` holds a finished one with the same ``key``) the database:
    ``levels`` points per sub-layer, or every GQA shape and every ``ffn_step`` channels.

    ``forward`` (default: ``adapter``) is the model whose dense forward gives the inputs, e.g. a
    bfloat16 twin on a CPU with native bf16 (``--search-dtype``): Hessians are still summed in
    float32/float64 and the solvers read ``adapter``'s own weights, so only the activations carry
    the twin's rounding, as they do in a bf16 model on a GPU. ``constraint`` (``--target``) keeps
    only the levels the engine serves (:func:`~slimgpt.search.levels.ladders`)."""
    db = LevelDatabase.open(folder, key)
    if db is not None:
        log.info("reusing the level database in %s", folder)
        return db
    timer = timer or Timer(device)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    torch.set_flush_denormal(True)
    dtype = next(adapter.model.parameters()).dtype
    index: dict[str, Any] = {"key": json.loads(json.dumps(key, default=str)), "levels": levels, "ffn_step": ffn_step,
                             "dtype": str(dtype).removeprefix("torch."), "ffn_group": [],
                             "attn_shapes": [], "attn_removed": [], "ffn_levels": [],
                             "errors": {"attn": [], "ffn": []}, "input_norms": []}
    for i, run in _dense_layers(forward or adapter, calib, device, batch_size, timer, progress,
                                "search: level database"):
        layer, s = adapter.layers[i], spaces[i]  # weights from the model itself (forward may be a bf16 twin)
        attn_levels, counts, group = ladders(s, levels, ffn_step, constraint)
        geo = adapter.geometry(layer)
        dense = run.dense_pass()  # one forward: both Hessians, the outputs, the input norms
        norms, Ho, Hd = list(dense.input_norms), dense.attn_hessian, dense.mlp_hessian
        del dense  # each Hessian is freed once its ladder is written
        # attention ladder
        o = adapter.attention(layer).o
        shapes, removed, errors = [], [], []
        with timer("solver"):
            Hinv0, _ = damped_inverse(Ho, damp, where=f"layer {i} o_proj")
            for level, (rem, options) in enumerate(attn_levels):
                removed.append(rem)
                if level == 0 or options[0][0] == s.num_kv_heads:  # dense, or the block removed
                    shapes.append(options[0])
                    errors.append(0.0 if level == 0 else _energy(o.weight.data.to(Ho.device), Ho))
                    continue
                best = None
                for g, r in options:
                    W = o.weight.data.to(Ho.device, torch.float32, copy=True)
                    res = prune_heads(W, Hinv0.clone(), geo.num_heads, geo.num_kv_heads, geo.head_dim, g, r, head_score)
                    e = sum(res.errors)
                    if best is None or e < best[0]:
                        cols = torch.tensor([h * geo.head_dim + d for h in res.kept_heads for d in range(geo.head_dim)])
                        best = (e, (g, r), res.kept_heads, W[:, cols].clone())
                e, shape, kept, w = best
                shapes.append(shape)
                errors.append(e)
                _save(folder / f"attn_{i:03d}_{level:03d}.pt", kept, w, e, dtype)
            del Ho, Hinv0  # nothing reads them again
        index["attn_shapes"].append(shapes)
        index["attn_removed"].append(removed)
        index["errors"]["attn"].append(errors)
        # FFN ladder, on the dense attention's outputs
        with timer("solver"):
            down = adapter.mlp(layer).down
            stored = counts[1:-1]  # dense and removed store nothing
            ffn_err = [0.0]
            if stored:
                grid = ffn_channels(s, group)
                grid = grid[: grid.index(stored[-1]) + 1]  # the path stops at the narrowest stored level
                Hinv, _ = damped_inverse(Hd, damp, where=f"layer {i} down_proj")
                path = ffn_path(down.weight.data.to(Hd.device, torch.float32, copy=True), Hinv, grid, keep=set(stored))
                del Hinv
                for level, (kept, w, e) in enumerate(path, start=1):
                    _save(folder / f"ffn_{i:03d}_{level:03d}.pt", kept, w, e, dtype)
                    ffn_err.append(e)
                del path
            ffn_err.append(_energy(down.weight.data.to(Hd.device), Hd))
            del Hd  # freed, not kept: a stitched fix-up recomputes its one (dense_mlp_hessian)
        index["ffn_levels"].append(counts)
        index["ffn_group"].append(group)
        index["errors"]["ffn"].append(ffn_err)
        index["input_norms"].append(norms)
    index["complete"] = True
    index["seconds"] = dict(timer.seconds)
    (folder / "index.json").write_text(json.dumps(index))
    return LevelDatabase(folder, index)
