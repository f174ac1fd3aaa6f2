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
