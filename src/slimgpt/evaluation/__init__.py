"""Evaluation: WikiText-2 perplexity (zero-shot tasks live in their own module).

The perplexity functions are imported on first use: :mod:`slimgpt.evaluation.results` and the
command line's argument parsing import this package and must not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["eval_text", "eval_windows", "perplexity", "windows_nll"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module("slimgpt.evaluation.perplexity")
    names = {n: getattr(module, n) for n in __all__}
    globals().update(names)  # also replaces the submodule attribute 'perplexity' by the function, as before
    return names[name]
