"""`slimgpt compare` on a tiny model: matched parameter counts, table output, registry pick-up."""

from __future__ import annotations

import json
import random

import pytest

from slimgpt.compare import format_table, order_methods, parse_ratios, resolve_methods, run_compare
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.methods import METHODS
from slimgpt.methods.base import GlobalMethod
from slimgpt.surgery import parameter_count


@pytest.fixture
def text_file(tmp_path):
    rnd = random.Random(0)
    f = tmp_path / "text.txt"
    f.write_text("\n\n".join(" ".join(f"t{rnd.randrange(3, 128)}" for _ in range(200)) for _ in range(30)))
    return str(f)


class _Broken(GlobalMethod):
    name = "broken"

    def plan(self, ctx):
        raise RuntimeError("boom")


def test_compare_matches_parameter_counts(tiny_llama_gqa, tiny_tokenizer, text_file, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "broken", lambda cfg: _Broken())
    dense = parameter_count(tiny_llama_gqa)
    base = PruneConfig(model="tiny", calib=text_file, nsamples=8, seqlen=32, batch_size=4)
    out = tmp_path / "cmp"
    res = run_compare("tiny", "0.3", "slimgpt,broken,blockpruner", out, base=base, ppl_dataset=text_file,
                      ppl_seqlen=32, max_windows=4, loaded=(tiny_llama_gqa, tiny_tokenizer), progress=False)
    assert res["methods"] == ["blockpruner", "slimgpt", "broken"]  # depth first
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["dense"]["params"] == dense and rows["dense"]["ppl"]["windows"] == 4
    bp, sg = rows["blockpruner"], rows["slimgpt"]
    assert sg["target_ratio"] == bp["removed_ratio"] and sg["matched_to"] == "blockpruner"
    assert bp["off_target_params"] == 0
    per_channel = 3 * 64  # gate/up rows + down column of one channel
    assert abs(sg["params"] - bp["params"]) <= per_channel
    assert abs(bp["removed_ratio"] - 0.3) < 0.1
    assert "boom" in rows["broken"]["error"]
    for r in (bp, sg):
        assert r["ppl"]["ppl"] > 1 and r["prune_s"] > 0 and r["peak_rss_mib"] > 0
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["dense", "blockpruner", "slimgpt", "broken"]
    md = (out / "compare.md").read_text()
    assert md.strip() == format_table(saved).strip()
    assert f"{bp['params']:,}" in md and f"{sg['params']:,}" in md and "boom" in md


def test_all_takes_whatever_the_registry_holds(monkeypatch):
    monkeypatch.setitem(METHODS, "latecomer", lambda cfg: _Broken())
    names = resolve_methods("all")
    assert "latecomer" in names and names == list(METHODS)
    ordered = [n for n, _ in order_methods(names, PruneConfig())]
    assert ordered.index("shortgpt") < ordered.index("blockpruner") < ordered.index("slimgpt")
    with pytest.raises(ConfigError):
        resolve_methods("slimgpt,nope")
    # "all" inside a list: the registry plus variants, each once, in the order given
    assert resolve_methods("all, slimgpt@search,flap") == list(METHODS) + ["slimgpt@search"]
    assert parse_ratios("0.2, 0.5") == [0.2, 0.5]
    with pytest.raises(ConfigError):
        parse_ratios("0.2,1.5")


def test_cli_compare(tiny_llama, tiny_tokenizer, text_file, tmp_path, monkeypatch, capsys):
    import slimgpt.preflight as preflight
    import slimgpt.zoo as zoo
    from slimgpt.cli import main

    monkeypatch.setattr(zoo, "load_model", lambda name, dtype=None, device="cpu": (tiny_llama, tiny_tokenizer))
    monkeypatch.setattr(preflight, "check_model", lambda name, check=None: name)  # "tiny" exists only in memory
    out = tmp_path / "c"
    rc = main(["compare", "tiny", "--ratio", "0.25", "--methods", "shortgpt,slimgpt", "--out", str(out),
               "--calib", text_file, "--nsamples", "4", "--seqlen", "32", "--ppl", text_file, "--ppl-seqlen", "32",
               "--max-windows", "2"])
    assert rc == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    sg = [r for r in rows if r["method"] == "shortgpt"][0]
    assert len(sg["search"]["removed_layers"]) == 1  # 25 % of the tiny model is one of its 4 layers
    assert [r["method"] for r in rows] == ["dense", "shortgpt", "slimgpt"]
    assert main(["compare", "tiny", "--methods", "nope", "--out", str(out)]) == 2
    assert json.loads((out / "compare.json").read_text())["settings"]["target"] == "any"
    # --target: a method the engine cannot serve is refused in one line, before any row runs
    assert main(["compare", "tiny", "--methods", "slimgpt,flap", "--target", "vllm", "--out", str(tmp_path / "t"),
                 "--calib", text_file, "--nsamples", "4", "--seqlen", "32"]) == 2
    assert not (tmp_path / "t" / "compare.json").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimgpt: error:") and "flap" in err and "--target" in err


def test_zero_shot_columns(tiny_llama, tiny_tokenizer, text_file, tmp_path, monkeypatch):
    import slimgpt.evaluation.zeroshot as zs

    calls = []

    def fake(model, tok, tasks, limit=None, batch_size=8, **kw):
        calls.append((tasks, limit))
        score = 0.5 + 0.01 * len(calls)
        return {"tasks": {"piqa": {"score": score, "metric": "acc_norm", "acc": 0.4, "acc_norm": score, "n": 3}},
                "average": score, "average_metric": "acc_norm", "wall_time_s": 0.1}

    monkeypatch.setattr(zs, "evaluate_tasks", fake)
    base = PruneConfig(model="tiny", calib=text_file, nsamples=4, seqlen=32)
    res = run_compare("tiny", [0.25], "shortgpt", tmp_path, base=base, ppl_dataset=text_file, ppl_seqlen=32,
                      max_windows=2, tasks="piqa", task_limit=3, loaded=(tiny_llama, tiny_tokenizer), progress=False)
    assert calls == [("piqa", 3), ("piqa", 3)]  # dense and the pruned model
    assert res["rows"][1]["zeroshot"]["tasks"]["piqa"]["score"] == pytest.approx(0.52)
    md = (tmp_path / "compare.md").read_text()
    assert "| piqa | zero-shot avg |" in md and "| 52.00 | 52.00 |" in md


def test_resume_keeps_finished_rows_and_refuses_other_settings(tiny_llama, tiny_tokenizer, text_file, tmp_path,
                                                               monkeypatch):
    import slimgpt.api

    base = PruneConfig(model="tiny", calib=text_file, nsamples=8, seqlen=32, batch_size=4)
    out = tmp_path / "cmp"
    kw = dict(base=base, ppl_dataset=text_file, ppl_seqlen=32, max_windows=4, progress=False)
    first = run_compare("tiny", "0.3", "shortgpt,magnitude", out, loaded=(tiny_llama, tiny_tokenizer), **kw)
    calls = []
    real = slimgpt.api.prune
    monkeypatch.setattr(slimgpt.api, "prune", lambda cfg, **k: calls.append(cfg.method) or real(cfg, **k))
    again = run_compare("tiny", "0.3", "shortgpt,magnitude,wanda-sp", out, loaded=(tiny_llama, tiny_tokenizer),
                        resume=True, **kw)
    assert calls == ["wanda-sp"]  # only the new method ran
    assert again["rows"][:3] == first["rows"]
    calls.clear()
    last = run_compare("tiny", "0.3", "shortgpt,magnitude", out, loaded=(tiny_llama, tiny_tokenizer), resume=True,
                       **kw)  # every row kept: the file must still be rewritten to what was asked
    assert calls == [] and json.loads((out / "compare.json").read_text())["rows"] == last["rows"]  # kept rows saved
    wanda = again["rows"][3]
    assert wanda["target_ratio"] == first["rows"][1]["removed_ratio"] and wanda["matched_to"] == "shortgpt"
    other = PruneConfig(model="tiny", calib=text_file, nsamples=4, seqlen=32, batch_size=4)
    with pytest.raises(ConfigError, match="--resume: .* another settings"):
        run_compare("tiny", "0.3", "magnitude", out, loaded=(tiny_llama, tiny_tokenizer), resume=True,
                    **{**kw, "base": other})


def test_schedule_variants_and_two_window_lengths(tiny_llama_gqa, tiny_tokenizer, text_file, tmp_path):
    """``slimgpt@uniform`` / ``slimgpt@search`` are rows of their own; perplexity at a second length
    reads the same tokens and equals a direct evaluation."""
    from slimgpt.evaluation.perplexity import perplexity

    base = PruneConfig(model="tiny", calib=text_file, nsamples=8, seqlen=32, batch_size=4, search_tokens="32,64",
                       search_survivors="3", search_offspring=4, search_generations=2, search_ffn_step=16)
    out = tmp_path / "cmp"
    res = run_compare("tiny", "0.3", "slimgpt,slimgpt@uniform,slimgpt@search", out, base=base,
                      ppl_dataset=text_file, ppl_seqlen="16,64", max_windows=8, ppl_protocol="gptq",
                      loaded=(tiny_llama_gqa, tiny_tokenizer), progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "slimgpt", "slimgpt@uniform", "slimgpt@search"]
    assert "error" not in rows["slimgpt@search"], rows["slimgpt@search"].get("error")
    assert rows["slimgpt@search"]["allocation_search"]["generations"] == 2
    for r in rows.values():
        assert set(r["ppl"]["by_seqlen"]) == {"16", "64"}
        cells = r["ppl"]["by_seqlen"]
        assert (cells["16"]["windows"], cells["64"]["windows"]) == (8, 2)  # 128 tokens at either length
    assert rows["slimgpt"]["ppl"]["ppl"] != rows["slimgpt@uniform"]["ppl"]["ppl"]  # another schedule ran
    direct = perplexity(tiny_llama_gqa, tiny_tokenizer, text_file, seqlen=64, max_windows=2, protocol="gptq",
                        progress=False)
    assert rows["dense"]["ppl"]["by_seqlen"]["64"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    md = (out / "compare.md").read_text()
    assert "PPL (seq 16) | seq 64 |" in md and "gptq protocol" in md and "slimgpt@search at 0.30: start" in md
    with pytest.raises(ConfigError, match="after '@'"):
        resolve_methods("slimgpt@nope")


def test_resume_reads_a_table_from_before_window_lengths(tiny_llama, tiny_tokenizer, text_file, tmp_path):
    base = PruneConfig(model="tiny", calib=text_file, nsamples=8, seqlen=32, batch_size=4)
    out = tmp_path / "cmp"
    kw = dict(base=base, ppl_dataset=text_file, ppl_seqlen=32, max_windows=4, progress=False)
    first = run_compare("tiny", "0.3", "shortgpt", out, loaded=(tiny_llama, tiny_tokenizer), **kw)
    old = json.loads((out / "compare.json").read_text())
    for key in ("ppl_seqlens", "ppl_protocol", "search_budget", "search_final"):
        del old["settings"][key]
    for r in old["rows"]:
        del r["ppl"]["by_seqlen"]
    (out / "compare.json").write_text(json.dumps(old))
    again = run_compare("tiny", "0.3", "shortgpt", out, loaded=(tiny_llama, tiny_tokenizer), resume=True, **kw)
    assert [r["ppl"]["ppl"] for r in again["rows"]] == [r["ppl"]["ppl"] for r in first["rows"]]
    assert f"{first['rows'][1]['ppl']['ppl']:.2f}" in format_table(again)


def test_benchmark_wrapper_is_the_cli_with_its_own_defaults():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
    spec = importlib.util.spec_from_file_location("bench_compare", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse(["--methods", "all,slimgpt@search", "--max-windows", "256", "--search-nsamples", "4"])
    assert (a.model, a.ratio, a.out, a.methods) == ("smollm2-135m", "0.2,0.5", str(bench.OUT), "all,slimgpt@search")
    assert (a.max_windows, a.search_nsamples, a.search_budget, a.nsamples) == (256, 4, "25m", None)
    q = bench.parse(["--quick", "--model", "qwen2.5-0.5b", "--ratios", "0.2", "--nsamples", "16", "--out", "x"])
    assert (q.model, q.ratio, q.out, q.nsamples, q.seqlen, q.max_windows) == ("qwen2.5-0.5b", "0.2", "x", 16, 128, 32)
    with pytest.raises(SystemExit):
        bench.parse(["--no-such-flag"])


def test_kept_models_are_evaluated_again_when_only_the_evaluation_changes(tiny_llama, tiny_tokenizer, text_file,
                                                                          tmp_path, monkeypatch):
    """--keep-models saves each row's model; a --resume that adds a window length evaluates those
    models again (no pruning) and reproduces the first length exactly; a row without a kept model
    is pruned again."""
    import slimgpt.api

    base = PruneConfig(model="tiny", calib=text_file, nsamples=8, seqlen=32, batch_size=4)
    out, keep = tmp_path / "cmp", tmp_path / "models"
    kw = dict(base=base, ppl_dataset=text_file, max_windows=4, progress=False, loaded=(tiny_llama, tiny_tokenizer))
    first = run_compare("tiny", "0.3", "shortgpt,magnitude", out, ppl_seqlen=16, keep_models=keep, **kw)
    rows = {r["method"]: r for r in first["rows"]}
    assert sorted(p.name for p in keep.iterdir()) == ["0.3-magnitude", "0.3-shortgpt"]
    assert rows["magnitude"]["model_dir"] == str((keep / "0.3-magnitude").resolve())
    saved = json.loads((out / "compare.json").read_text())
    for r in saved["rows"]:  # a row without its kept model must be pruned again
        if r["method"] == "shortgpt":
            del r["model_dir"]
    (out / "compare.json").write_text(json.dumps(saved))

    calls = []
    real = slimgpt.api.prune
    monkeypatch.setattr(slimgpt.api, "prune", lambda cfg, **k: calls.append(cfg.method) or real(cfg, **k))
    again = run_compare("tiny", "0.3", "shortgpt,magnitude", out, ppl_seqlen="16,32", resume=True, **kw)
    assert calls == ["shortgpt"]
    new = {r["method"]: r for r in again["rows"]}
    for m in ("dense", "shortgpt", "magnitude"):
        assert set(new[m]["ppl"]["by_seqlen"]) == {"16", "32"}
        assert new[m]["ppl"]["by_seqlen"]["16"]["ppl"] == rows[m]["ppl"]["by_seqlen"]["16"]["ppl"]
    assert new["magnitude"]["prune_s"] == rows["magnitude"]["prune_s"]  # the first run's pruning, not a new one
    assert json.loads((out / "compare.json").read_text())["settings"]["ppl_seqlens"] == [16, 32]
    with pytest.raises(ConfigError, match="another settings"):  # a pruning setting still may not change
        run_compare("tiny", "0.3", "magnitude", out, ppl_seqlen=16, resume=True,
                    **{**kw, "base": PruneConfig(model="tiny", calib=text_file, nsamples=4, seqlen=32, batch_size=4)})
