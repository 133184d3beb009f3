"""What ``--target`` changes in the allocations, before any model is pruned (issue #32, part 4).

For SmolLM2-135M (20 %, 50 %) and Qwen2.5-Coder-0.5B (20 %), solve the ``--schedule auto``
family and the ``log`` / ``uniform`` schedules with no target, ``--target vllm`` and
``--target sglang`` from the models' published layer shapes, and record, per member, whether the
constrained widths equal the free ones and how many parameters each removes. A member whose widths
are equal builds the same model (the auto pass scores the same family, so it chooses the same
member and SlimGPT prunes to the same widths): its perplexity cost is zero without a run.

    python benchmarks/target_family.py      # -> benchmarks/results/vllm/target_family.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

from slimgpt.allocation import candidates
from slimgpt.schedule import LayerSpace, removed_params, solve_widths, target_constraint

OUT = Path(__file__).resolve().parent / "results" / "vllm" / "target_family"

# (layers, LayerSpace, all parameters): per_q_head = q rows + o columns (+ q bias), per_kv_head = k and
# v rows (+ biases), per_channel = gate/up rows + down column; the totals are the models' own counts.
MODELS = {
    "smollm2-135m": (30, LayerSpace(9, 3, 1536, 2 * 64 * 576, 2 * 64 * 576, 3 * 576), 134_515_008, "llama"),
    "qwen2.5-coder-0.5b": (24, LayerSpace(14, 2, 4864, 2 * 64 * 896 + 64, 2 * 64 * 896 + 128, 3 * 896),
                           630_167_424, "qwen2"),  # untied output head
}
RUNS = [("smollm2-135m", 0.2), ("smollm2-135m", 0.5), ("qwen2.5-coder-0.5b", 0.2)]


def shapes(ws, s):
    return [(w.heads(s), w.kv_heads(s), w.channels) for w in ws]


def main() -> None:
    rows = []
    for model, ratio in RUNS:
        n, space, total, family = MODELS[model]
        spaces = [space] * n
        free = candidates(spaces, total, ratio)
        free.update({k: solve_widths(spaces, total, ratio, k) for k in ("uniform",)})
        for target in ("vllm", "sglang"):
            c = target_constraint(target, family)
            fam = candidates(spaces, total, ratio, constraint=c)
            fam.update({k: solve_widths(spaces, total, ratio, k, constraint=c) for k in ("uniform",)})
            for name in sorted(set(free) | set(fam)):
                f, t = free.get(name), fam.get(name)
                rows.append({
                    "model": model, "ratio": ratio, "target": target, "route": c.route, "member": name,
                    "free_removed": removed_params(spaces, f) if f else None,
                    "target_removed": removed_params(spaces, t) if t else None,
                    "same_widths": bool(f and t and shapes(f, space) == shapes(t, space)),
                    "attention_removed_free": sum(h == 0 for h, _, _ in shapes(f, space)) if f else None,
                })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = ["# `--target` against the free allocation: same widths?", "",
             "`python benchmarks/target_family.py`; widths solved from the models' published layer shapes.", "",
             "| model | ratio | target (route) | member | same widths | removed free / target | attention blocks removed (free) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ratio']:.0%} | {r['target']} ({r['route']}) | {r['member']} | "
                     f"{'yes' if r['same_widths'] else 'no'} | {r['free_removed']} / {r['target_removed']} | "
                     f"{r['attention_removed_free']} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
