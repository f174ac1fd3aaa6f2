"""Several teachers: combining ensemble members into distillation targets (see :mod:`medkd.teachers.combine`)."""

from medkd.teachers.combine import (
    COMBINATION_RULES,
    MeanMemberKLLoss,
    adaptive_probabilities,
    check_member_stack,
    combine,
    confidence_weights,
    dice_member_weights,
    mean_logits,
    mean_probabilities,
    member_uncertainty,
    voxel_uncertainty,
)

__all__ = [
    "COMBINATION_RULES",
    "MeanMemberKLLoss",
    "adaptive_probabilities",
    "check_member_stack",
    "combine",
    "confidence_weights",
    "dice_member_weights",
    "mean_logits",
    "mean_probabilities",
    "member_uncertainty",
    "voxel_uncertainty",
]
