"""Defaults and choices the command line shows in ``--help``, in a module that imports nothing.

Argument parsing must not import torch or transformers (seconds): a typo is answered in about a
second. The modules that use these values import them from here.
"""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"

# The paper calibrates on 256 × 2048 tokens (GPU). On 2 CPU cores that is hours for the default
# model, so CPU runs default to 64 × 512 tokens (a few minutes for SmolLM2-135M).
GPU_NSAMPLES, GPU_SEQLEN = 256, 2048
CPU_NSAMPLES, CPU_SEQLEN = 64, 512

PROTOCOLS = ("slimgpt", "gptq")
"""Perplexity window protocols (:mod:`slimgpt.evaluation.perplexity`)."""
DEFAULT_PROTOCOL = PROTOCOLS[0]  # also what tables made before the choice existed used

TABLE4_NEW_TOKENS = 512
"""The paper's Table 4 setting: 512 generated tokens ("the maximum output limit is set to 512")."""

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Weight types of ``export --to gguf`` (:mod:`slimgpt.export.gguf`)."""
DEFAULT_GGUF_TYPE = "f16"
