"""What a method decides for one layer, in a form every method shares.

Methods edit weights in place on the full-size model (pruned columns zeroed, remaining ones
compensated) and record what they keep; :mod:`slimgpt.surgery` then physically removes
everything not kept. One path from decision to saved folder for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerPlan:
    """Kept query heads (sorted, equal count per key/value group) and kept FFN channels.

    ``None`` means "untouched". An empty list removes the whole block (attention or MLP).
    """

    kept_heads: list[int] | None = None
    kept_channels: list[int] | None = None
    stats: dict = field(default_factory=dict)

    def kept_kv_heads(self, num_heads: int, num_kv_heads: int) -> list[int] | None:
        """Key/value heads that still serve at least one kept query head."""
        if self.kept_heads is None:
            return None
        n_rep = num_heads // num_kv_heads
        return sorted({h // n_rep for h in self.kept_heads})
