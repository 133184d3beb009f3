"""Does ``--schedule auto``'s score rank its candidates as their built models' perplexities rank?

For MODEL at RATIO, every candidate of the auto family is

(a) **scored** as the auto pass scores it, in one pass that keeps every candidate's KL per scoring
    window: ``heldout`` is exactly what ``slimgpt prune --schedule auto`` computes (the calibration
    windows right after the Hessian windows), ``insample`` the score before held-out windows (the
    first Hessian windows: the pass's Hessians saw them), ``heldoutN`` a longer held-out score (the
    auto pass's windows and ``--extra-windows`` more), ``fresh`` windows drawn from the same corpus
    with another seed (``--fresh-windows``; seen neither by the pass nor by the final prune, which
    calibrates on all ``--nsamples`` windows);
(b) **built for real**: sequential SlimGPT at exactly the candidate's widths (``--schedule
    WIDTHS.json``: the ordinary prune, DGS and propagated inputs), then its KL from the dense model
    on every scoring window (``built_fresh`` is what scoring the top candidates for real would rank
    by) and its WikiText-2 perplexity (seq 128, 256 windows, the project's evaluation);
(c) **ranked**: Spearman's rank correlation of every proxy (and of the built models' KL on each
    proxy's windows, ``built_*``) with the built perplexity.

    SLIMGPT_DATA=../shared/data python benchmarks/auto_proxy.py smollm2-135m --ratio 0.2
    # → benchmarks/results/auto_proxy/smollm2-135m-0.2.json and .md

Resumable: the JSON is rewritten after the scoring pass and after every candidate, and a re-run
with the same settings skips what is finished (SmolLM2-135M on 2 quiet cores, estimated: ~4 min of
scoring on 24 windows, then ~3-4 min per candidate: prune, 24 windows' KL, 256 perplexity windows;
Qwen2.5-Coder-0.5B about 4× that). A check of the script itself (SmolLM2's DGS solves cost
~1.5 min per candidate even on tiny calibration; ``tests/test_allocation.py`` runs it on a tiny
random model):

    python benchmarks/auto_proxy.py smollm2-135m --ratio 0.2 --nsamples 8 --seqlen 64 --max-windows 4 \\
        --only log,log-a0 --out /tmp/auto_proxy_smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from slimgpt import __version__, allocation, pipeline
from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.evaluation.perplexity import perplexity
from slimgpt.io import atomic_path
from slimgpt.search.fitness import DenseTarget

OUT = Path(__file__).resolve().parent / "results" / "auto_proxy"
log = logging.getLogger("auto_proxy")


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); ``None`` under 3 points or when
    either side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        k = 0
        while k < len(order):
            j = k
            while j + 1 < len(order) and v[order[j + 1]] == v[order[k]]:
                j += 1
            for t in range(k, j + 1):
                r[order[t]] = (k + j) / 2 + 1
            k = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _write(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True, folder=False) as tmp:
        tmp.write_text(text)


@torch.no_grad()
def built_kl(dense: Any, pruned: Any, calib: torch.Tensor, at: list[int], device: torch.device) -> list[float]:
    """Per window of ``at``: the built model's per-token mean KL(dense || pruned), the auto pass's KL
    (:class:`~slimgpt.search.fitness.DenseTarget`) on whole-model logits."""
    out = []
    for w in at:
        ids = calib[w : w + 1].to(device)
        target = DenseTarget(dense(ids).logits[0])
        out.append(float(target.kl(pruned(ids).logits[0]).mean()))
    return out


def evaluate(model: Any, tok: Any, a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Perplexity at every ``--ppl-seqlen``, each over the tokens the first length's windows hold."""
    lengths = [int(x) for x in a.ppl_seqlen.split(",")]
    return {str(L): perplexity(model, tok, a.ppl_dataset, seqlen=L, max_windows=max(1, a.max_windows * lengths[0] // L),
                               data_dir=a.data_dir, device=device, progress=False)["ppl"] for L in lengths}


def table(doc: dict[str, Any]) -> str:
    """The Markdown beside the JSON: every candidate's proxies and built numbers, then the ranks."""
    s, rows = doc["settings"], doc["rows"]
    proxies = list(doc["proxies"])
    built = [p for p in ("heldout", "fresh") if p in proxies]  # the built models' KL on those windows
    lengths = s["ppl_seqlen"].split(",")
    first = lengths[0]
    lines = [f"# `--schedule auto` proxy check: {s['model']} at {s['ratio']:.0%}", "",
             f"Calibration {s['calib']} {s['nsamples']}×{s['seqlen']} (seed {s['seed']}); Hessian windows "
             f"0-{doc['windows']['hessian'] - 1}; dense perplexity "
             + ", ".join(f"seq {k} {v:.2f}" for k, v in doc.get("dense_ppl", {}).items()) + ".", "",
             "| candidate | " + " | ".join(f"{p} KL" for p in proxies) + " | "
             + " | ".join(f"built KL ({p})" for p in built) + " | "
             + " | ".join(f"PPL seq {L}" for L in lengths) + " | prune s |",
             "|---|" + "---:|" * (len(proxies) + len(built) + len(lengths) + 1)]
    order = sorted(doc["proxies"]["heldout"]["scores"], key=lambda n: rows[n]["ppl"][first] if n in rows else math.inf)
    for n in order:
        r = rows.get(n)
        mark = f"**{n}**" if n == doc["proxies"]["heldout"]["chosen"] else n
        cells = [f"{doc['proxies'][p]['scores'][n]:.4f}" for p in proxies]
        if r is None:
            cells += ["–"] * (len(built) + len(lengths) + 1)
        else:
            cells += [*(f"{r['kl'][p]:.4f}" for p in built), *(f"{r['ppl'][L]:.2f}" for L in lengths),
                      f"{r['prune_s']:.0f}"]
        lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    lines += ["", f"**bold**: the auto pass's choice (held-out score; pass {doc['pass_s']:.0f} s with the extra "
              "windows). Spearman rank correlation with the built perplexity (seq "
              f"{first}, {len(rows)} of {len(order)} candidates built):", ""]
    for name, v in doc["spearman"].items():
        lines.append(f"- {name}: {'–' if v is None else f'{v:+.3f}'}")
    if doc.get("spearman_vs_built_kl"):
        lines += ["", "Each proxy against the built models' KL on the same windows (the stitched, dense-Hessian "
                  "solve against the real sequential prune, same metric):", ""]
        for name, v in doc["spearman_vs_built_kl"].items():
            lines.append(f"- {name}: {'–' if v is None else f'{v:+.3f}'}")
    if doc.get("regret"):
        lines += ["", "Regret (the chosen candidate's built perplexity over the lowest, −1): "
                  + "; ".join(f"{p} {v:+.1%}" for p, v in doc["regret"].items()) + "."]
    if rows:
        best = min(rows, key=lambda n: rows[n]["ppl"][first])
        lines.append("")
        lines.append(f"Lowest built perplexity: `{best}` ({rows[best]['ppl'][first]:.2f}); each proxy's choice: "
                     + "; ".join(f"{p} `{d['chosen']}`" + (f" ({rows[d['chosen']]['ppl'][first]:.2f})"
                                                           if d["chosen"] in rows else "")
                                 for p, d in doc["proxies"].items()) + ".")
    return "\n".join(lines) + "\n"


def summarise(doc: dict[str, Any], first: str) -> None:
    """Rank correlations and regrets over the candidates built so far (rewritten after each)."""
    names = list(doc["proxies"]["heldout"]["scores"])
    built = [n for n in names if n in doc["rows"]]
    ppl = [doc["rows"][n]["ppl"][first] for n in built]
    doc["spearman"] = {p: spearman([d["scores"][n] for n in built], ppl) for p, d in doc["proxies"].items()}
    for p in doc["proxies"]:
        doc["spearman"][f"built_{p}"] = spearman([doc["rows"][n]["kl"][p] for n in built], ppl)
    # the proxy against the built model on its own metric and windows: how much of the rank gap is
    # the stitched dense-Hessian solve (this) and how much is KL on C4 against WikiText perplexity
    doc["spearman_vs_built_kl"] = {p: spearman([d["scores"][n] for n in built], [doc["rows"][n]["kl"][p] for n in built])
                                   for p, d in doc["proxies"].items()}
    best = min(ppl) if ppl else None
    doc["regret"] = {p: doc["rows"][d["chosen"]]["ppl"][first] / best - 1 for p, d in doc["proxies"].items()
                     if best and d["chosen"] in doc["rows"]}  # the chosen candidate's perplexity over the best's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name or model folder")
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--nsamples", type=int, help="calibration windows (default: the prune's, 64 on a CPU)")
    ap.add_argument("--seqlen", type=int, help="calibration window length (default: the prune's, 512 on a CPU)")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--extra-windows", type=int, default=12,
                    help="held-out windows scored beyond the auto pass's, for the longer held-out proxy")
    ap.add_argument("--fresh-windows", type=int, default=4,
                    help="windows drawn with another seed (seed + 1), outside the calibration, for the fresh proxy")
    ap.add_argument("--ppl-dataset", default="wikitext2")
    ap.add_argument("--ppl-seqlen", default="128", help="comma list; the first is the ranked one")
    ap.add_argument("--max-windows", type=int, default=256, help="perplexity windows of the first length")
    ap.add_argument("--data-dir")
    ap.add_argument("--only", help="comma list of candidates to build (default: all)")
    ap.add_argument("--out", default=str(OUT), help="folder for MODEL-RATIO.json / .md")
    ap.add_argument("--name", help="file stem (default: MODEL-RATIO)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stem = a.name or f"{Path(a.model).name}-{a.ratio:g}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path, md = out / f"{stem}.json", out / f"{stem}.md"

    cfg = PruneConfig(model=a.model, ratio=a.ratio, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                      device=a.device, dtype=a.dtype, batch_size=a.batch_size, data_dir=a.data_dir)
    run = pipeline.start(cfg, in_memory=True)
    pipeline.load(run)
    pipeline.calibrate(run)
    c, device = run.cfg, run.device
    assert c.nsamples is not None and c.seqlen is not None and run.calib is not None
    settings = {"model": a.model, "ratio": a.ratio, "calib": a.calib, "nsamples": c.nsamples, "seqlen": c.seqlen,
                "seed": a.seed, "device": str(device), "dtype": str(run.dtype).removeprefix("torch."),
                "batch_size": a.batch_size, "extra_windows": a.extra_windows, "fresh_windows": a.fresh_windows,
                "ppl_dataset": a.ppl_dataset,
                "ppl_seqlen": a.ppl_seqlen, "max_windows": a.max_windows}
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if doc and doc.get("settings") != settings:
        raise ConfigError(f"{path} was made with other settings ({doc.get('settings')}); delete it or give --name")
    doc.setdefault("settings", settings)
    doc.setdefault("rows", {})
    doc["slimgpt_version"], doc["torch_threads"] = __version__, torch.get_num_threads()
    tok, dense = run.tokenizer, run.model
    calib = run.calib  # the calibration, then the fresh windows (another seed, the same corpus)
    if a.fresh_windows:
        from slimgpt.data.calibration import sample_calibration

        fresh, _ = sample_calibration(a.calib, tok, a.fresh_windows, c.seqlen, a.seed + 1, a.data_dir)
        calib = torch.cat([run.calib, fresh])

    def save() -> None:
        summarise(doc, a.ppl_seqlen.split(",")[0])
        _write(path, json.dumps(doc, indent=1) + "\n")
        _write(md, table(doc))

    if "proxies" not in doc:  # (a) one scoring pass, every candidate's KL per window
        family = allocation.candidates(run.spaces, run.dense_params, a.ratio, c.first_ratio)
        hess, score = allocation.auto_windows(c.nsamples, c.seqlen, run.spaces)
        extra = max(0, min(a.extra_windows, c.nsamples - hess - score))
        held = list(range(hess, hess + score))
        groups = {"heldout": held, "insample": list(range(score))}
        if extra:
            groups[f"heldout{score + extra}"] = list(range(hess, hess + score + extra))
        if a.fresh_windows:
            groups["fresh"] = list(range(c.nsamples, c.nsamples + a.fresh_windows))
        at = sorted({w for g in groups.values() for w in g})
        st = allocation.AutoSettings(hess, at, head_score=getattr(run.method, "head_score", "gcd"),
                                     min_group=c.min_group, damp=c.damp, batch_size=a.batch_size)
        t = time.perf_counter()
        res = allocation.choose_allocation(run.adapter, calib, run.spaces, family, device, st)
        doc["pass_s"] = time.perf_counter() - t
        doc["pass_time_s"] = res.seconds
        doc["windows"] = {"hessian": hess, "score_at": at, **groups, "fresh_seed": a.seed + 1}
        doc["family"] = {n: [asdict(w) for w in ws] for n, ws in family.items()}
        doc["kl_by_window"] = res.window_scores
        doc["proxies"] = {}
        for p, idx in groups.items():
            scores = {n: sum(v[at.index(w)] for w in idx) / len(idx) for n, v in res.window_scores.items()}
            doc["proxies"][p] = {"windows": idx, "scores": scores,
                                 "chosen": min(scores, key=lambda n: (scores[n], list(scores).index(n)))}
        save()
    if "dense_ppl" not in doc:
        doc["dense_ppl"] = evaluate(dense.to(device), tok, a, device)
        dense.to("cpu")
        save()

    at = doc["windows"]["score_at"]
    names = a.only.split(",") if a.only else list(doc["family"])
    unknown = [n for n in names if n not in doc["family"]]
    if unknown:
        raise ConfigError(f"--only: no candidate {unknown}; the family is {', '.join(doc['family'])}")
    widths_dir = out / f"{stem}.widths"
    widths_dir.mkdir(exist_ok=True)
    for name in names:  # (b) each candidate built for real
        if name in doc["rows"]:
            log.info("%s: built before, kept", name)
            continue
        wfile = widths_dir / f"{name}.json"
        _write(wfile, json.dumps(doc["family"][name]) + "\n")
        t = time.perf_counter()
        res = prune(PruneConfig(**{**cfg.to_dict(), "schedule": str(wfile)}), model=copy.deepcopy(dense),
                    tokenizer=tok)
        wall = time.perf_counter() - t
        widths = allocation.read_widths_file(wfile, run.spaces)
        assert widths is not None
        want = [(f"{w.heads(s)}/{s.num_heads}", f"{w.channels}/{s.channels}") for w, s in zip(widths, run.spaces)]
        got = [(r["heads"], r["channels"]) for r in res.report["layers"]]
        if got != want:
            raise AssertionError(f"{name}: the prune did not build the candidate's widths")
        model = res.model.to(device)
        per_window = built_kl(dense.to(device), model, calib, at, device)
        dense.to("cpu")
        kl = {p: sum(per_window[at.index(w)] for w in doc["windows"][p]) / len(doc["windows"][p])
              for p in doc["proxies"]}
        doc["rows"][name] = {"kl": kl, "kl_by_window": per_window, "ppl": evaluate(model, tok, a, device),
                             "prune_s": res.report["time_s"]["prune_total"], "wall_s": wall,
                             "params": res.report["params"]["pruned"],
                             "removed_ratio": res.report["params"]["removed_ratio"]}
        log.info("%s: built KL %s, PPL %s", name, {p: round(v, 4) for p, v in kl.items()}, doc["rows"][name]["ppl"])
        del res, model
        gc.collect()
        save()
    save()
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
