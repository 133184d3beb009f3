"""Model surgery: turn a model pruned *in place* into a physically smaller slim model.

Pruning methods zero what they remove (o_proj columns of removed query heads, down_proj columns of
removed channels) and compensate the rest, on the full-size model, and record what they keep in a
:class:`~slimgpt.plan.LayerPlan` per layer. :func:`shrink_model` then drops, per planned layer:

- removed query heads: their q_proj rows (+ bias) and o_proj columns;
- key/value heads that serve no kept query head: their k_proj / v_proj rows (+ bias);
- removed channels: their gate_proj / up_proj rows and down_proj columns.

The result is a ``SlimLlamaForCausalLM`` / ``SlimQwen2ForCausalLM`` / ``SlimGemma3ForCausalLM``
(:mod:`slimgpt.modeling`) whose config lists each layer's sizes. Since the removed pieces were
already zero, its outputs equal those of the zeroed full-size model. (Gemma 3's q_norm / k_norm
act per head over ``head_dim`` and stay as they are.)

Memory: weights are sliced layer by layer in place on the input model (each slice replaces its
source matrix at once, so the peak is the model plus one matrix) and then *moved*, not copied, into
a slim model built on the meta device. Two full copies never coexist, which matters for models that
barely fit; the price is that the input model is consumed (deep-copy it first if you need it).

The same cut (:func:`_cut_layer`) serves passes that run many pruned forms of one model without
keeping them (``--schedule auto``'s scoring, the search's stitcher): :class:`LayerSwap` installs a
layer's pruned form over its dense tensors and puts them back.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from transformers import PreTrainedModel

from slimgpt.arch import get_adapter
from slimgpt.arch.base import HeadGeometry, ModelAdapter
from slimgpt.errors import ConfigError, ModelError
from slimgpt.modeling import SLIM_CLASSES
from slimgpt.modeling.configuration_slimgpt import LAYER_FIELDS
from slimgpt.plan import LayerPlan


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: ``{"heads", "kv_heads", "channels"}`` as read off the weights."""
    adapter = get_adapter(model)
    shapes = []
    for layer in adapter.layers:
        g = adapter.geometry(layer)
        shapes.append({"heads": g.num_heads, "kv_heads": g.num_kv_heads,
                       "channels": adapter.intermediate_size(layer)})
    return shapes


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters; tensors shared by several modules (tied embeddings) count once."""
    seen: set = set()
    total = 0
    for p in model.parameters():  # unique by identity already; also merge distinct views of one storage
        no_storage = p.device.type == "meta" or p.numel() == 0
        key = id(p) if no_storage else (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def shrink_model(model: PreTrainedModel, plans: dict[int, LayerPlan]) -> PreTrainedModel:
    """Physically remove what ``plans`` does not keep; returns a slim model (same dtype/device).

    Layers absent from ``plans`` and plan fields that are ``None`` stay as they are. Every plan is
    validated before anything is touched, so a :class:`ConfigError` leaves the input intact;
    otherwise the input model is consumed (see the module docstring).
    """
    adapter = get_adapter(model)
    model_type = model.config.model_type
    if model_type not in SLIM_CLASSES:
        raise ModelError(f"no slim format for architecture '{model_type}' yet "
                         f"(supported: {', '.join(sorted(SLIM_CLASSES))})")
    config_cls, model_cls = SLIM_CLASSES[model_type]

    cuts = _validated_cuts(adapter, plans)
    shapes = layer_shapes(model)
    for i, (heads, kv_heads, channels) in cuts.items():
        if heads is not None:
            shapes[i]["heads"], shapes[i]["kv_heads"] = len(heads), len(kv_heads)
        if channels is not None:
            shapes[i]["channels"] = len(channels)

    config = _slim_config(model, config_cls, model_cls.__name__, shapes)
    with torch.device("meta"):
        slim = model_cls(config)

    with torch.no_grad():
        for i, (heads, kv_heads, channels) in cuts.items():
            _cut_layer(adapter, adapter.layers[i], heads, kv_heads, channels)
    _move_tensors(model, slim)
    slim.generation_config = copy.deepcopy(model.generation_config)
    slim.train(model.training)
    return slim


# ---- validation -------------------------------------------------------------------------------------

_Cut = tuple[list[int] | None, list[int] | None, list[int] | None]  # kept heads, kv heads, channels


def _validated_cuts(adapter: ModelAdapter, plans: dict[int, LayerPlan]) -> dict[int, _Cut]:
    cuts: dict[int, _Cut] = {}
    for i, plan in sorted(plans.items()):
        if not (isinstance(i, int) and 0 <= i < adapter.num_layers):
            raise ConfigError(f"plan for layer {i}: the model has layers 0..{adapter.num_layers - 1}")
        layer = adapter.layers[i]
        g = adapter.geometry(layer)
        heads = _check_indices(i, "kept_heads", plan.kept_heads, g.num_heads)
        kv_heads = None
        if heads is not None:
            _check_groups(i, heads, g)
            kv_heads = plan.kept_kv_heads(g.num_heads, g.num_kv_heads) if heads else []
        channels = _check_indices(i, "kept_channels", plan.kept_channels, adapter.intermediate_size(layer))
        cuts[i] = (heads, kv_heads, channels)
    return cuts


def _check_indices(layer: int, name: str, kept: list[int] | None, size: int) -> list[int] | None:
    if kept is None:
        return None
    kept = [int(k) for k in kept]
    if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not (0 <= kept[0] and kept[-1] < size)):
        raise ConfigError(f"layer {layer}: {name} must be sorted, unique and within 0..{size - 1}, got {kept}")
    return kept


def _check_groups(layer: int, heads: list[int], g: HeadGeometry) -> None:
    """Stock attention maps query head j to key/value head j // n_rep, so every surviving key/value
    group must keep the same number of query heads (a group may go entirely)."""
    per_group = Counter(h // g.n_rep for h in heads)
    if len(set(per_group.values())) > 1:
        raise ConfigError(f"layer {layer}: kept_heads {heads} keep unequal numbers of query heads per "
                          f"key/value group {dict(per_group)}; keep the same count in every group")


# ---- slicing -----------------------------------------------------------------------------------------


def head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs, and their bias entries) and/or ``cols`` (inputs) of ``lin``;
    ``weight`` (already the kept columns, e.g. OBS-compensated ones kept apart from the dense
    layer) replaces the column slice, in ``lin``'s device and dtype."""
    old = lin.weight
    new = old.data
    if rows is not None:
        new = new.index_select(0, rows.to(new.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, rows.to(new.device)),
                                    requires_grad=lin.bias.requires_grad)
    if weight is not None:
        new = weight.to(device=new.device, dtype=new.dtype)
    elif cols is not None:
        new = new.index_select(1, cols.to(new.device))
    lin.weight = nn.Parameter(new, requires_grad=old.requires_grad)
    lin.out_features, lin.in_features = new.shape


def _cut_layer(adapter: ModelAdapter, layer: nn.Module, heads: list[int] | None, kv_heads: list[int] | None,
               channels: list[int] | None, o_weight: torch.Tensor | None = None,
               down_weight: torch.Tensor | None = None) -> None:
    """The one way a layer is cut (the saved model, a streamed layer, and the temporary cuts of
    :class:`LayerSwap`): q/k/v rows of the kept heads, their o_proj columns (or ``o_weight``),
    gate/up rows of the kept channels, their down_proj columns (or ``down_weight``); then the
    adapter brings the attention's head counts in line with the weights."""
    if heads is not None and kv_heads is not None:
        g = adapter.geometry(layer)
        lin = adapter.attention(layer)
        if len(heads) < g.num_heads or o_weight is not None:
            q_rows = head_rows(heads, g.head_dim, lin.q.weight.device)
            _slice_linear(lin.q, rows=q_rows)
            _slice_linear(lin.o, cols=q_rows, weight=o_weight)
        if len(kv_heads) < g.num_kv_heads:
            kv_rows = head_rows(kv_heads, g.head_dim, lin.k.weight.device)
            _slice_linear(lin.k, rows=kv_rows)
            _slice_linear(lin.v, rows=kv_rows)
        adapter.sync_attention(layer)
    if channels is not None and (len(channels) < adapter.intermediate_size(layer) or down_weight is not None):
        mlp = adapter.mlp(layer)
        idx = torch.tensor(channels, dtype=torch.long, device=mlp.down.weight.device)
        _slice_linear(mlp.gate, rows=idx)
        _slice_linear(mlp.up, rows=idx)
        _slice_linear(mlp.down, cols=idx, weight=down_weight)


class LayerSwap:
    """Temporary cuts of decoder layer ``index`` over its dense tensors, for passes that run many
    pruned forms of one model (``--schedule auto``'s candidates, the search's stitched variants).

    :meth:`cut` installs a pruned form exactly as the final model holds it (validated as plans
    are, sliced by :func:`_cut_layer`, the head counts set through the adapter), with the
    compensated output columns kept apart (``o_weight`` / ``down_weight``); :meth:`restore` puts
    the dense tensor objects back. The dense tensors are never edited or copied."""

    def __init__(self, adapter: ModelAdapter, index: int) -> None:
        self.adapter, self.index = adapter, index
        self.layer = layer = adapter.layers[index]
        a, m = adapter.attention(layer), adapter.mlp(layer)
        self._dense = {
            "attention": [(lin, lin.weight, lin.bias) for lin in (a.q, a.k, a.v, a.o)],
            "mlp": [(lin, lin.weight, lin.bias) for lin in (m.gate, m.up, m.down)],
        }

    def restore(self, attention: bool = True, mlp: bool = True) -> None:
        """Put the dense tensors of the chosen blocks back."""
        for part in ("attention",) * attention + ("mlp",) * mlp:
            for lin, w, b in self._dense[part]:
                lin.weight, lin.bias = w, b
                lin.out_features, lin.in_features = w.shape
        if attention:
            self.adapter.sync_attention(self.layer)

    @torch.no_grad()
    def cut(self, heads: list[int] | None = None, o_weight: torch.Tensor | None = None,
            channels: list[int] | None = None, down_weight: torch.Tensor | None = None) -> None:
        """Cut the blocks given (``None``: that block is left as it is) from their dense tensors:
        keep query ``heads`` with ``o_weight`` as o_proj, ``channels`` with ``down_weight`` as
        down_proj (``None`` weights: the dense columns, uncompensated)."""
        if heads is not None:
            self.restore(attention=True, mlp=False)
        if channels is not None:
            self.restore(attention=False, mlp=True)
        (h, kv, c), = _validated_cuts(self.adapter, {self.index: LayerPlan(heads, channels)}).values()
        _cut_layer(self.adapter, self.layer, h, kv, c, o_weight, down_weight)


# ---- the slim model -----------------------------------------------------------------------------------


def _slim_config(model: PreTrainedModel, config_cls: type, arch_name: str, shapes: list[dict[str, int]]):
    """The input's config (stock fields unchanged) plus the per-layer lists."""
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", *LAYER_FIELDS):
        fields.pop(key, None)
    adapter = get_adapter(model)
    fields["head_dim"] = adapter.geometry(adapter.layers[0]).head_dim
    # biases added by compensating methods (FLAP) where the stock architecture has none
    fields["o_proj_bias"] = any(adapter.attention(lay).o.bias is not None for lay in adapter.layers)
    fields["down_proj_bias"] = any(adapter.mlp(lay).down.bias is not None for lay in adapter.layers)
    config = config_cls(
        **fields,
        architectures=[arch_name],
        layer_num_attention_heads=[s["heads"] for s in shapes],
        layer_num_key_value_heads=[s["kv_heads"] for s in shapes],
        layer_intermediate_size=[s["channels"] for s in shapes],
    )
    config._attn_implementation = model.config._attn_implementation
    return config


def _move_tensors(src: nn.Module, dst: nn.Module) -> None:
    """Give every parameter and buffer of ``dst`` (built on meta) the same-named tensor object of
    ``src``. Moving the objects keeps tied weights tied and copies nothing."""
    src_modules = dict(src.named_modules())
    for name, module in dst.named_modules():
        source = src_modules.get(name)
        for store in ("_parameters", "_buffers"):
            target = getattr(module, store)
            for key, expected in target.items():
                tensor = getattr(source, store).get(key) if source is not None else None
                if (tensor is None) != (expected is None) or (tensor is not None and tensor.shape != expected.shape):
                    raise RuntimeError(f"surgery bug: {name}.{key} missing or misshaped in the source model")
                target[key] = tensor
    left = [n for n, t in [*dst.named_parameters(), *dst.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"surgery bug: tensors left on the meta device: {left[:5]}")


# ---- one layer at a time (streaming and checkpointed runs: slimgpt.streaming) --------------------


def shrink_layer(adapter: ModelAdapter, index: int, plan: LayerPlan) -> None:
    """Cut decoder layer ``index`` in place to ``plan``, exactly as :func:`shrink_model` cuts it.

    For pipelines that finish layers one at a time and must not keep the full-size layer (a
    streamed model has only one layer in memory). Works on the meta device too (shapes only).
    """
    cuts = _validated_cuts(adapter, {index: plan})
    with torch.no_grad():
        _cut_layer(adapter, adapter.layers[index], *cuts[index])


def slim_config(model: PreTrainedModel) -> tuple[object, type]:
    """(slim config, slim model class) for ``model`` whose layers are already cut (weights may be on
    the meta device): the config.json a saved folder gets, without building the slim model."""
    model_type = model.config.model_type
    if model_type not in SLIM_CLASSES:
        raise ModelError(f"no slim format for architecture '{model_type}' yet "
                         f"(supported: {', '.join(sorted(SLIM_CLASSES))})")
    config_cls, model_cls = SLIM_CLASSES[model_type]
    return _slim_config(model, config_cls, model_cls.__name__, layer_shapes(model)), model_cls
