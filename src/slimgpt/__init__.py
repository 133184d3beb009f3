"""slimgpt: structured pruning of LLMs (SlimGPT, BlockPruner)."""

__version__ = "0.1.0"

import slimgpt.modeling  # noqa: F401  (registers the slim model types with transformers' Auto classes)
