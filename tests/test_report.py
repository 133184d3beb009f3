"""``slimgpt report`` on a tiny pruned folder: PNGs, Markdown, and per-layer errors checked
against ``output_hidden_states``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.api import prune
from slimgpt.cli import main
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.evaluation.results import EVAL_KIND
from slimgpt.report import layer_error_stats, layer_output_errors, write_report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dense() -> LlamaForCausalLM:
    return build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2, tie_word_embeddings=False)


def _text(n_docs: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "\n\n".join(" ".join(f"t{rnd.randrange(3, 128)}" for _ in range(120)) for _ in range(n_docs))


@pytest.fixture
def run_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(20, 0))
    out = tmp_path / "pruned"
    cfg = PruneConfig(model="tiny", out=str(out), ratio=0.4, calib=str(calib), nsamples=8, seqlen=32)
    prune(cfg, model=_dense(), tokenizer=tiny_tokenizer, progress=False)
    return out


@pytest.fixture
def held_out(tmp_path: Path) -> str:
    f = tmp_path / "held_out.txt"
    f.write_text(_text(4, 1))
    return str(f)


def _eval_doc() -> dict:
    def ppl(v: float) -> dict:
        return {"ppl": v, "windows": 3, "seqlen": 16, "dataset": {"name": "held_out.txt"}, "protocol": "p"}

    zs = {"tasks": {"piqa": {"score": 0.6, "metric": "acc_norm"}, "boolq": {"score": 0.55, "metric": "acc"}},
          "average": 0.575, "num_fewshot": 0, "limit": None, "lm_eval_version": "x", "average_metric": "m"}
    low = {**zs, "tasks": {"piqa": {"score": 0.5, "metric": "acc_norm"}, "boolq": {"score": 0.5, "metric": "acc"}},
           "average": 0.5}
    return {"kind": EVAL_KIND, "models": [
        {"label": "dense", "model": "d", "params": 10, "ppl": {"16": ppl(20.0)}, "zeroshot": zs},
        {"label": "pruned", "model": "p", "params": 6, "ppl": {"16": ppl(35.0)}, "zeroshot": low},
    ]}


def test_report_writes_pngs_and_markdown(run_dir: Path, held_out: str, tiny_tokenizer) -> None:
    (run_dir / "eval.json").write_text(json.dumps(_eval_doc()))
    md_path = write_report(run_dir, dense=(_dense(), tiny_tokenizer), error_data=held_out, error_windows=3,
                           error_seqlen=16)
    md = md_path.read_text()
    for name in ("layer_ratios.png", "layer_error.png", "ppl.png", "zeroshot.png"):
        png = run_dir / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, name
        assert f"]({name})" in md, name
    meta = json.loads((run_dir / "slimgpt.json").read_text())
    for layer in meta["layers"]:  # the per-layer table shows what was kept
        assert f"| {layer['layer']} | {layer['schedule_ratio']:.3f} |" in md
    assert "| pruned | p |" in md and "57.50" in md  # eval tables from eval.json
    report = json.loads((run_dir / "report.json").read_text())
    errors = report["layer_output_error"]
    assert len(errors["relative"]) == 4 and all(e > 0 for e in errors["relative"])
    assert "| 3 | 0." in md and f"{errors['median_token'][3]:.3g} |" in md


def test_layer_errors_match_output_hidden_states(run_dir: Path, tiny_tokenizer) -> None:
    from slimgpt.io import load_pruned

    dense = _dense()
    pruned, _ = load_pruned(run_dir)
    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(7))
    errors = layer_output_errors(dense, pruned, ids, batch_size=2)
    with torch.no_grad():
        hd = dense(ids, output_hidden_states=True).hidden_states
        hp = pruned(ids, output_hidden_states=True).hidden_states
    # hidden_states[l + 1] is layer l's output, except the last entry (after the final norm).
    stats = layer_error_stats(dense, pruned, ids, batch_size=3)
    for i in range(len(errors) - 1):
        d, p = hd[i + 1].double(), hp[i + 1].double()
        assert errors[i] == pytest.approx(float((p - d).pow(2).sum() / d.pow(2).sum()), rel=1e-6)
        per_token = ((p - d).pow(2).sum(-1) / d.pow(2).sum(-1)).flatten()
        assert stats["median_token"][i] == pytest.approx(float(per_token.median()), rel=1e-6)
        norms = d.pow(2).sum(-1).flatten()
        big = norms[norms > 100 * norms.median()]
        assert stats["massive_share"][i] == pytest.approx(float(big.sum() / norms.sum()), rel=1e-6, abs=1e-12)
        first = d[:, 0].pow(2).sum(-1).sum()
        assert stats["first_token_share"][i] == pytest.approx(float(first / norms.sum()), rel=1e-6)
    assert stats["relative"] == pytest.approx(errors, rel=1e-9)
    assert layer_output_errors(dense, dense, ids) == [0.0] * 4


def test_report_cli_without_dense_model(run_dir: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # slimgpt.json names the model "tiny", which cannot be loaded: the report says so and goes on.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (run_dir / "report.md").read_text()
    assert "layer_ratios.png" in md and "layer_error.png" not in md and not (run_dir / "ppl.png").exists()
    assert "Per-layer output error not computed" in md
    assert main(["report", str(run_dir), "--no-layer-error"]) == 0
    assert "not computed" not in (run_dir / "report.md").read_text()


def test_report_refuses_a_folder_without_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="slimgpt.json"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("slimgpt: error:")
