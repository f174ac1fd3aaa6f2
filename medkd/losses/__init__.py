"""Losses for supervised training and knowledge distillation."""

from medkd.losses.supervised import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    DiceLovaszLoss,
    LovaszSoftmaxLoss,
    build_supervised_loss,
    prepare_target,
)

__all__ = [
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceLoss",
    "DiceLovaszLoss",
    "LovaszSoftmaxLoss",
    "build_supervised_loss",
    "prepare_target",
]

# distillation losses
from medkd.losses.contrastive import SupervisedInfoNCELoss  # noqa: E402
from medkd.losses.distill_registry import DISTILL_LOSSES, build_distill_loss, describe  # noqa: E402
from medkd.losses.features import AttentionTransferLoss, FeatureDistillationLoss, PairwiseSKDLoss  # noqa: E402
from medkd.losses.logits import ChannelWiseDistillationLoss, KLDivergenceLoss, ProbabilityMSELoss  # noqa: E402
from medkd.losses.regions import MSCALoss, MSSARDLoss, RegionAffinityLoss  # noqa: E402

__all__ += [
    "AttentionTransferLoss",
    "ChannelWiseDistillationLoss",
    "DISTILL_LOSSES",
    "FeatureDistillationLoss",
    "KLDivergenceLoss",
    "MSCALoss",
    "MSSARDLoss",
    "PairwiseSKDLoss",
    "ProbabilityMSELoss",
    "RegionAffinityLoss",
    "SupervisedInfoNCELoss",
    "build_distill_loss",
    "describe",
]
