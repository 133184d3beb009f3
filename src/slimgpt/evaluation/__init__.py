"""Evaluation: WikiText-2 perplexity (zero-shot tasks live in their own module)."""

from slimgpt.evaluation.perplexity import eval_text, eval_windows, perplexity, windows_nll

__all__ = ["eval_text", "eval_windows", "perplexity", "windows_nll"]
