"""Checkpoints of a recovery run, so that ``--resume`` continues it exactly.

A run with an output folder ``OUT`` keeps its checkpoints in ``OUT.recovery/`` beside it:

    state.json              settings that decide the result, the step reached, history, current folder
    pool.pt                 windows sampled from the teacher (written once: sampling is the costly part)
    step-000040/            trainable tensors (safetensors), optimiser state, RNG states, top-k cache

A checkpoint is taken only between optimiser steps, when the weights, the optimiser and the RNGs
describe one finished step (the RNG states are snapshots taken right after that step, so a Ctrl-C
in the middle of the next one saves the state of the last finished step). The step folder is
written complete under a temporary name and renamed, then ``state.json`` is replaced atomically
(the commit point), then the previous step folder is deleted: a kill at any instant leaves a usable
checkpoint. Everything else a step depends on is a function of the settings and the step number
(the window order, the learning rate), so the resumed run computes what the uninterrupted one would
have, bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimgpt.errors import ConfigError

FORMAT = 1


def rng_snapshot() -> dict[str, Any]:
    """The RNG states a step consumes (torch CPU and CUDA, Python's ``random``)."""
    snap: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore_rng(snap: dict[str, Any]) -> None:
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["python"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


class RunCheckpoint:
    """The checkpoint folder of one run (see the module docstring)."""

    def __init__(self, out: str | Path, settings: dict[str, Any]) -> None:
        self.folder = self.folder_for(out)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.state: dict[str, Any] | None = None

    @staticmethod
    def folder_for(out: str | Path) -> Path:
        out = Path(out).expanduser().resolve()
        return out.with_name(out.name + ".recovery")

    # ---- opening -------------------------------------------------------------------------------

    def open(self, resume: bool) -> dict[str, Any] | None:
        """The saved state when resuming (None if nothing was saved yet); without ``resume`` an
        existing folder is refused, so two runs never mix their checkpoints."""
        state_file = self.folder / "state.json"
        if not resume:
            if state_file.exists():
                raise ConfigError(f"{self.folder} holds a checkpoint of an interrupted run; add --resume to continue "
                                  "it, or delete the folder to start again")
            return None
        if not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        if state.get("format") != FORMAT:
            raise ConfigError(f"{self.folder} was written by another slimgpt version; delete it and start again")
        diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                      if state["settings"].get(k) != self.settings.get(k))
        if diff:
            shown = ", ".join(f"{k}: {state['settings'].get(k)!r} → {self.settings.get(k)!r}" for k in diff[:4])
            raise ConfigError(f"--resume with other settings than the interrupted run ({shown}); use the same "
                              f"command, or delete {self.folder} to start again")
        self.state = state
        return state

    def load_step(self) -> dict[str, Any]:
        """Tensors, optimiser state, RNG snapshot and extras of the committed step."""
        assert self.state is not None
        step_dir = self.folder / self.state["current"]
        out = {"weights": load_file(step_dir / "weights.safetensors"),
               **torch.load(step_dir / "state.pt", weights_only=False)}
        return out

    # ---- saving --------------------------------------------------------------------------------

    def save_pool(self, pool: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "pool.pt.tmp"
        torch.save(pool, tmp)
        os.replace(tmp, self.folder / "pool.pt")

    def load_pool(self) -> dict[str, Any] | None:
        path = self.folder / "pool.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save(self, step: int, weights: dict[str, torch.Tensor], extra: dict[str, Any],
             info: dict[str, Any]) -> None:
        """Commit step ``step``: ``weights`` (trainable tensors), ``extra`` (optimiser state, RNG
        snapshot, caches; pickled) and ``info`` (JSON: tokens, history)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        tmp = self.folder / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
        torch.save(extra, tmp / "state.pt")
        final = self.folder / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        previous = (self.state or {}).get("current")
        state = {"format": FORMAT, "settings": self.settings, "step": step, "current": name, **info}
        state_tmp = self.folder / "state.json.tmp"
        state_tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
        os.replace(state_tmp, self.folder / "state.json")
        self.state = state
        if previous and previous != name:
            shutil.rmtree(self.folder / previous, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["RunCheckpoint", "restore_rng", "rng_snapshot"]
