"""Recovery of a pruned model: distillation from its dense teacher, or the LM loss; full-parameter or LoRA.

``config`` holds the settings and their checks, ``plan`` what the defaults resolve to (batch, steps,
learning-rate schedule), ``data`` packs and mixes text sources and samples text from the teacher,
``split`` sees a model as decoder + head, ``losses`` holds the KL / top-k KL / LM losses (computed a
chunk of the head at a time), ``teacher`` the teacher's targets and their top-k cache,
``evaluation`` the held-out scoring, ``loop`` the training loop (AdamW, bf16 autocast, progress,
data parallelism), ``memory`` the allocator tuning, ``checkpoint`` the exact resume, ``api`` the
run from folders to folder. ``slimgpt finetune`` is the command on top; the
distillation side is kept apart from pruning, as Model Optimizer keeps ``distill`` apart from
``prune``.
"""

from slimgpt.recovery.api import RecoveryResult, recover, save_recovered
from slimgpt.recovery.config import RecoveryConfig

__all__ = ["RecoveryConfig", "RecoveryResult", "recover", "save_recovered"]
