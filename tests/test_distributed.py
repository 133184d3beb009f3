"""torchrun data parallelism on CPU (gloo): two processes started the way torchrun starts them
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) must prune to the single-process model:
the same kept heads and channels (the sliced q/k/v/gate/up rows are bitwise equal), compensated
o/down weights within the summation-order tolerance below, a bitwise-equal BlockPruner search and
perplexity; a killed rank stops the other with one line and the run resumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimgpt import distributed
from slimgpt.checkpoint import KILL_ENV, RANK_ENV, Checkpoint
from slimgpt.cli import main
from test_streaming import RUN, assert_same_weights, calib_text, save_tiny, weights

# Hessians summed in another order (two partial sums instead of one running sum, fp32) move the
# compensated o_proj/down_proj weights by a few float32 ulps; measured on this model: max abs
# difference 2.4e-07 (weights ~0.1). Anything that changes a kept index is orders larger.
ATOL = 1e-5
SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "norm", "embed")
PROGRAM = ("import json, sys\nfrom slimgpt.cli import main\n"
           "for args in json.loads(sys.argv[1]):\n    rc = main(args)\n    if rc:\n        sys.exit(rc)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, *commands: list[str], env: dict[str, str] | None = None,
           timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``slimgpt`` commands (in order, in one interpreter per rank) on ``n`` ranks started as
    torchrun starts them; returns every rank's outcome."""
    port = str(free_port())
    procs = []
    for r in range(n):
        e = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
             distributed.TIMEOUT_ENV: "60", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, "-c", PROGRAM, json.dumps(list(commands))], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def assert_same_model(ref: Path, got: Path) -> float:
    """Same kept heads/channels (sliced tensors bitwise equal), compensated ones within ATOL;
    returns the largest difference."""
    a, b = weights(ref), weights(got)
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        if any(s in k for s in SLICED):
            assert torch.equal(a[k], b[k]), k
        worst = max(worst, (a[k] - b[k]).abs().max().item())
    assert worst <= ATOL, worst
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    return save_tiny(tmp / "src"), calib_text(tmp / "calib.txt"), tmp


def test_batches_are_split_whole_and_exactly_once() -> None:
    for n_batches in (1, 5, 8, 13):
        for n in (1, 2, 3, 8):
            spans = [distributed.batch_range(n_batches, r, n) for r in range(n)]
            assert [b for s in spans for b in s] == list(range(n_batches))
            assert max(map(len, spans)) - min(map(len, spans)) <= 1


def test_two_ranks_prune_and_evaluate_like_one(setup) -> None:
    """SlimGPT, BlockPruner and perplexity in one two-rank launch (one start-up cost)."""
    src, calib, tmp = setup
    common = [str(src), "--calib", str(calib), *RUN]
    slim, block = ["prune", *common, "--out"], ["prune", *common, "--method", "blockpruner", "--blocks", "3",
                                                "--search-dtype", "float32", "--out"]
    ev = ["eval", "--ppl", str(calib), "--seqlen", "32", "--batch-size", "2", "--no-baseline", "--json"]
    assert main([*slim, str(tmp / "slim1")]) == 0
    assert main([*block, str(tmp / "block1")]) == 0
    assert main([*ev, str(tmp / "ppl1.json"), str(tmp / "slim1")]) == 0
    r0, r1 = launch(2, [*slim, str(tmp / "slim2")], [*block, str(tmp / "block2")],
                    [*ev, str(tmp / "ppl2.json"), str(tmp / "slim2")])
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr[-3000:] + r1.stderr[-3000:]
    assert "parameters:" in r0.stdout and r1.stdout == ""  # rank 0 prints for both
    report = json.loads((tmp / "slim2" / "slimgpt.json").read_text())
    assert report["processes"] == 2 and report["time_s"]["communication"] > 0
    assert_same_model(tmp / "slim1", tmp / "slim2")
    assert_same_weights(tmp / "block1", tmp / "block2")  # per-batch NLLs summed in batch order: bitwise
    s1, s2 = (json.loads((tmp / f"slim{i}" / "slimgpt.json").read_text())["method"] for i in (1, 2))
    b1, b2 = (json.loads((tmp / f"block{i}" / "slimgpt.json").read_text())["method"]["search"] for i in (1, 2))
    assert b1["removed"] == b2["removed"] and b1["steps"] == b2["steps"] and b1["block_passes"] == b2["block_passes"]
    p1, p2 = (json.loads((tmp / f"ppl{i}.json").read_text())["models"][0]["ppl"]["32"] for i in (1, 2))
    assert p1["tokens"] == p2["tokens"] and p1["ppl"] == p2["ppl"]  # bitwise
    assert s1 == s2


def test_a_killed_rank_stops_the_other_cleanly_and_the_run_resumes(setup) -> None:
    src, calib, tmp = setup
    ref, out = tmp / "ref", tmp / "killed"
    args = ["prune", str(src), "--calib", str(calib), *RUN, "--out", str(out)]
    if not ref.exists():
        assert main(["prune", str(src), "--calib", str(calib), *RUN, "--out", str(ref)]) == 0
    r0, r1 = launch(2, args, env={KILL_ENV: "1", RANK_ENV: "1"})
    assert r1.returncode == -signal.SIGKILL
    lines = r0.stderr.strip().splitlines()
    assert r0.returncode == 2 and lines[-1].startswith("slimgpt: error (rank 0): another process"), r0.stderr[-3000:]
    assert "2 of 4 layers are saved" in lines[-1] and "--resume" in lines[-1] and "Traceback" not in r0.stderr
    assert not out.exists()  # nothing half-written
    assert json.loads((Checkpoint.folder_for(out) / "state.json").read_text())["done"] == 2
    r0, r1 = launch(2, [*args, "--resume"])
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr[-3000:] + r1.stderr[-3000:]
    assert json.loads((out / "slimgpt.json").read_text())["resumed_from_layer"] == 2
    assert not Checkpoint.folder_for(out).exists()
    assert_same_model(ref, out)
