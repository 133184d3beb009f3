"""Recovery of a pruned model: distillation from its dense teacher, or the LM loss; full-parameter or LoRA.

``data`` packs and mixes text sources and samples text from the teacher, ``losses`` holds the KL /
top-k KL / LM losses (computed a chunk of the head at a time), ``loop`` the training loop (AdamW,
warm-up + cosine, bf16 autocast, evaluation, progress, data parallelism), ``checkpoint`` the exact
resume, ``api`` the run from folders to folder. ``slimgpt finetune`` is the command on top; the
distillation side is kept apart from pruning, as Model Optimizer keeps ``distill`` apart from
``prune``.
"""

from slimgpt.recovery.api import RecoveryResult, recover, save_recovered
from slimgpt.recovery.loop import RecoveryConfig

__all__ = ["RecoveryConfig", "RecoveryResult", "recover", "save_recovered"]
