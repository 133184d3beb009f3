"""What shapes the serving engines accept, in one place: the prune's ``--target`` and the
``--to vllm`` export both ask this module, so a model pruned for an engine is one it serves.

A pruned model is a list of per-layer shapes ``(query heads, key/value heads, FFN channels)``
(0 heads: attention block removed; 0 channels: MLP block removed). Engines read them through
two routes (see ``docs/usage.md``, "Serve with vLLM"):

- ``deci`` (vLLM's ``DeciLMForCausalLM``, Nemotron-NAS ``block_configs``; SGLang and TensorRT-LLM
  read the same format): one query-head count for the whole model, per-layer key/value heads
  (query heads divisible by them), per-layer FFN width, attention and MLP blocks may be removed.
  SGLang/TensorRT-LLM take the FFN width only as ``ffn_mult``, i.e. a multiple of 256.
- ``transformers`` (vLLM's Transformers backend with transformers' ``per_layer_config``):
  per-layer query and key/value heads and FFN widths, MLP blocks may be removed, but every layer
  must keep its attention.

This module imports nothing heavy: argument checks and the export's refusal use it before torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimgpt.errors import ConfigError

TARGETS = ("any", "vllm", "sglang")
SGLANG_FFN_UNIT = 256

Shape = tuple[int, int, int]  # (query heads, key/value heads, FFN channels) of one decoder layer


@dataclass(frozen=True)
class Constraint:
    """The shape rules a prune must stay inside for one engine route.

    ``keep_attention``: no layer loses all its heads. ``uniform_heads``: every layer that keeps
    attention keeps the same query-head count (whole attention blocks may go). ``ffn_unit``: kept FFN widths are multiples of it (removal, 0, is allowed)."""

    route: str
    keep_attention: bool = False
    uniform_heads: bool = False
    ffn_unit: int = 1

    def violation(self, shapes: list[Shape]) -> str | None:
        """The first layer these rules refuse, as ``'layer i: why'``; ``None`` when all are served."""
        kept = [h for h, _, _ in shapes if h]
        for i, (h, kv, f) in enumerate(shapes):
            if h == 0 and self.keep_attention:
                return f"layer {i}: its attention block is removed"
            if h and (kv == 0 or h % kv):
                return f"layer {i}: {h} query heads cannot share {kv} key/value heads evenly"
            if self.uniform_heads and h and h != kept[0]:
                return f"layer {i}: {h} query heads where layer {shapes.index(next(s for s in shapes if s[0]))} has {kept[0]} (one count per model)"
            if f % self.ffn_unit:
                return f"layer {i}: FFN width {f} is not a multiple of {self.ffn_unit}"
        return None


# Routes in the order an export tries them.
ROUTES: dict[str, tuple[Constraint, ...]] = {
    "vllm": (Constraint("transformers", keep_attention=True), Constraint("deci", uniform_heads=True)),
    "sglang": (Constraint("deci", uniform_heads=True, ffn_unit=SGLANG_FFN_UNIT),),
}


def route_for(target: str, shapes: list[Shape]) -> Constraint:
    """The first route of ``target`` that serves ``shapes``; a one-line ConfigError naming the first
    offending layer and the prune option that avoids it when none does."""
    if target not in ROUTES:
        raise ConfigError(f"unknown serving target '{target}'; choose one of {', '.join(ROUTES)}")
    reasons = []
    for c in ROUTES[target]:
        why = c.violation(shapes)
        if why is None:
            return c
        reasons.append(f"{c.route} route: {why}")
    raise ConfigError(f"{target} cannot serve this model ({'; '.join(reasons)}); "
                      f"prune it again with --target {target}")


__all__ = ["ROUTES", "SGLANG_FFN_UNIT", "TARGETS", "Constraint", "Shape", "route_for"]
