"""slimgpt: structured pruning of LLMs (SlimGPT, BlockPruner)."""

__version__ = "0.1.0"


def _register(_transformers: object) -> None:
    import slimgpt.modeling  # noqa: F401  (registers the slim model types with transformers' Auto classes)


from slimgpt.lazy import when_imported  # noqa: E402

# The registration needs transformers (seconds to import): it runs when transformers is imported,
# by whoever imports it, so ``import slimgpt`` stays instant (the command line answers a typo fast).
when_imported("transformers", _register)
