"""--resume: a run killed after layer k (SIGKILL, no chance to clean up) and resumed must give
bitwise the weights of an uninterrupted run, in memory and streamed, and across the two; the output
folder appears only when complete; resuming with other settings is refused in one line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from slimgpt.checkpoint import KILL_ENV, Checkpoint
from slimgpt.cli import main
from test_streaming import RUN, assert_same_weights, calib_text, run_cli, save_tiny, tree_digest


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model folder, calibration file, uninterrupted in-memory result)."""
    src = save_tiny(tmp_path / "src")
    calib = calib_text(tmp_path / "calib.txt")
    ref = tmp_path / "ref"
    assert main(["prune", str(src), "--out", str(ref), "--calib", str(calib), *RUN]) == 0
    return src, calib, ref


def killed(src: Path, calib: Path, out: Path, after: int, *extra: str) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself right after committing layer ``after``."""
    r = run_cli("prune", str(src), "--out", str(out), "--calib", str(calib), *RUN, *extra,
                env={KILL_ENV: str(after)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()  # the output appears only when complete
    state = json.loads((Checkpoint.folder_for(out) / "state.json").read_text())
    assert state["done"] == after + 1


def resume(src: Path, calib: Path, out: Path, *extra: str) -> None:
    assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN, *extra, "--resume"]) == 0
    assert not Checkpoint.folder_for(out).exists()  # cleaned up once the output is in place


def test_killed_in_memory_run_resumes_identically(setup, tmp_path: Path) -> None:
    src, calib, ref = setup
    before = tree_digest(src)
    out = tmp_path / "out"
    killed(src, calib, out, 1)
    work = Checkpoint.folder_for(out)
    assert sorted(p.name for p in work.iterdir()) == ["inputs-00002", "layer-00000.safetensors",
                                                      "layer-00001.safetensors", "state.json"]
    # debris of a kill in the middle of layer 2's writes must not matter
    (work / "layer-00002.safetensors.tmp").write_bytes(b"half a layer")
    (work / "inputs-00003.tmp").mkdir()
    resume(src, calib, out)
    assert_same_weights(ref, out)
    assert tree_digest(src) == before


def test_checkpoints_do_not_depend_on_how_layers_were_held(setup, tmp_path: Path, monkeypatch) -> None:
    """Streamed → resumed in memory, and in memory → resumed streamed: the same weights."""
    src, calib, ref = setup
    a, b = tmp_path / "a", tmp_path / "b"
    killed(src, calib, a, 0, "--max-memory", "1KiB")
    resume(src, calib, a)
    assert_same_weights(ref, a)
    _partial_run(src, calib, b, monkeypatch, after=2)
    resume(src, calib, b, "--max-memory", "1KiB")
    assert_same_weights(ref, b)


def test_kill_after_last_layer_resumes_to_assembly_only(setup, tmp_path: Path, monkeypatch) -> None:
    src, calib, ref = setup
    out = tmp_path / "out"
    killed(src, calib, out, 3, "--max-memory", "1KiB")

    def no_layers(*a, **k):
        raise AssertionError("all layers were done; nothing should be pruned again")

    monkeypatch.setattr("slimgpt.pipeline.run_layerwise", no_layers)
    resume(src, calib, out, "--max-memory", "1KiB")
    assert_same_weights(ref, out)


def _partial_run(src: Path, calib: Path, out: Path, monkeypatch, after: int = 1) -> None:
    """An in-process run interrupted (KeyboardInterrupt) after committing layer ``after``."""
    commit = Checkpoint.commit

    def interrupt(self, index, plan, hidden):
        commit(self, index, plan, hidden)
        if index == after:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "commit", interrupt)
        assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN]) == 130
    assert Checkpoint.folder_for(out).is_dir() and not out.exists()


def last_line(capsys) -> str:
    """The error line; it must be the only one mentioning an error and carry no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:] and lines[-1].startswith("slimgpt: error:")
    assert not any("Traceback" in ln for ln in lines)
    return lines[-1]


def test_resume_with_other_settings_is_refused(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    src, calib, ref = setup
    out = tmp_path / "out"
    _partial_run(src, calib, out, monkeypatch)
    work = Checkpoint.folder_for(out)
    saved = tree_digest(work)
    capsys.readouterr()
    args = ["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN]
    assert main([*args, "--ratio", "0.4", "--resume"]) == 2
    err = last_line(capsys)
    assert "ratio: 0.3 → 0.4" in err and "--resume" in err
    other = calib_text(tmp_path / "other.txt", seed=1)
    assert main(["prune", str(src), "--out", str(out), "--calib", str(other), *RUN, "--resume"]) == 2
    err = last_line(capsys)
    assert "calib" in err
    assert main(args) == 2  # no --resume: refuse rather than silently discard finished layers
    err = last_line(capsys)
    assert "add --resume" in err
    assert tree_digest(work) == saved  # refusals leave the checkpoint as it was
    state = json.loads((work / "state.json").read_text())  # a checkpoint from before two options existed:
    for k in ("compensate", "shrink"):  # it ran with their defaults, and resumes
        del state["settings"][k]
    (work / "state.json").write_text(json.dumps(state))
    resume(src, calib, out)
    assert_same_weights(ref, out)


def test_resume_without_checkpoint_starts_fresh(setup, tmp_path: Path) -> None:
    src, calib, ref = setup
    resume(src, calib, tmp_path / "out")
    assert_same_weights(ref, tmp_path / "out")


def test_corrupt_checkpoint_is_refused(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    src, calib, _ = setup
    out = tmp_path / "out"
    _partial_run(src, calib, out, monkeypatch)
    (Checkpoint.folder_for(out) / "state.json").write_text("{not json")
    capsys.readouterr()
    assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN, "--resume"]) == 2
    err = last_line(capsys)
    assert "not a usable slimgpt checkpoint" in err and "delete it" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_files_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    from slimgpt.checkpoint import read_tensors, write_tensors

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 7, generator=g).to(dtype), torch.randn(1, 5, 7, generator=g).to(dtype)]
    xs[0][0, 0, 0] = float("inf")
    specs = write_tensors(tmp_path / "acts", xs)
    for mmap in (False, True):
        back = read_tensors(tmp_path / "acts", specs, mmap)
        assert all(b.dtype == dtype and torch.equal(a, b) for a, b in zip(xs, back))


def test_work_folder_without_a_commit_is_restarted(setup, tmp_path: Path) -> None:
    """Killed between writing layer 0 and committing it: nothing finished, so no --resume needed."""
    src, calib, ref = setup
    out = tmp_path / "out"
    work = Checkpoint.folder_for(out)
    work.mkdir()
    (work / "layer-00000.safetensors").write_bytes(b"written, never committed")
    (work / "state.json.tmp").write_text("{")
    assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN]) == 0
    assert_same_weights(ref, out)


def test_foreign_folder_named_like_a_work_folder_is_left_alone(setup, tmp_path: Path, capsys) -> None:
    src, calib, _ = setup
    out = tmp_path / "out"
    work = Checkpoint.folder_for(out)
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *RUN, "--resume"]) == 2
    assert "is not a slimgpt work folder" in last_line(capsys)
    assert (work / "notes.txt").read_text() == "mine" and not out.exists()


def test_sigterm_says_what_is_saved_and_resumes(setup, tmp_path: Path) -> None:
    """SIGTERM (schedulers, ``timeout``) is handled like Ctrl-C: one line on what is checkpointed
    and how to continue, exit 143, no output folder; --resume then finishes to the same weights."""
    from slimgpt.checkpoint import SIGNAL_ENV

    src, calib, ref = setup
    out = tmp_path / "out"
    r = run_cli("prune", str(src), "--out", str(out), "--calib", str(calib), *RUN,
                env={KILL_ENV: "1", SIGNAL_ENV: "TERM"})
    assert r.returncode == 143, r.stderr[-2000:]
    assert "2 of 4 layers are saved" in r.stderr and "--resume" in r.stderr
    assert "slimgpt: terminated (SIGTERM)" in r.stderr
    assert not out.exists()
    resume(src, calib, out)
    assert_same_weights(ref, out)


AUTO = [("auto" if a == "log" else a) for a in RUN]  # the default schedule, whose pass a resume must not redo


def test_auto_allocation_is_kept_for_the_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--schedule auto`` keeps its choice in the work folder: a run interrupted before its first
    layer was committed, or killed after its second, resumes without choosing again, and ends
    bitwise where an uninterrupted run ends."""
    src, calib = save_tiny(tmp_path / "src"), calib_text(tmp_path / "calib.txt")
    ref = tmp_path / "ref"
    assert main(["prune", str(src), "--out", str(ref), "--calib", str(calib), *AUTO]) == 0
    chosen = json.loads((ref / "slimgpt.json").read_text())["method"]["auto"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as m:  # stopped after choosing, before any layer
        m.setattr("slimgpt.pipeline.run_layerwise", interrupted)
        assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *AUTO]) == 130
    work = Checkpoint.folder_for(out)
    assert sorted(p.name for p in work.iterdir()) == ["allocation.json"]
    capsys.readouterr()
    assert main(["prune", str(src), "--out", str(out), "--calib", str(calib), *AUTO]) != 0  # not without --resume
    assert "--resume" in capsys.readouterr().err

    def no_choice(*a, **k):
        raise AssertionError("the allocation was chosen already")

    monkeypatch.setattr("slimgpt.allocation.choose_allocation", no_choice)
    resume(src, calib, out, "--schedule", "auto")
    assert_same_weights(ref, out)
    again = json.loads((out / "slimgpt.json").read_text())["method"]["auto"]
    assert again["from_checkpoint"] and again["chosen"] == chosen["chosen"] and again["kl"] == chosen["kl"]

    killed_out = tmp_path / "killed"
    r = run_cli("prune", str(src), "--out", str(killed_out), "--calib", str(calib), *AUTO, env={KILL_ENV: "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (Checkpoint.folder_for(killed_out) / "allocation.json").is_file()
    resume(src, calib, killed_out, "--schedule", "auto")
    assert_same_weights(ref, killed_out)
