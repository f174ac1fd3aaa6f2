"""Validation Dice during training, on preprocessed cases (the grid the network sees)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn

from medkd.data.preprocess import PreprocessedCase
from medkd.engine.inference import predict_probabilities


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Foreground Dice per class for label maps (*spatial); NaN where the class is absent from both."""
    pred_1h = one_hot(pred[None, None].long(), num_classes)
    label_1h = one_hot(label[None, None].long(), num_classes)
    dice = compute_dice(pred_1h, label_1h, include_background=False, ignore_empty=False)[0].numpy()
    absent = (label_1h.sum(dim=tuple(range(2, label_1h.ndim)))[0, 1:] == 0) & (
        pred_1h.sum(dim=tuple(range(2, pred_1h.ndim)))[0, 1:] == 0)
    dice[absent.numpy()] = np.nan
    return dice


def validate(model: nn.Module, cases: Sequence[PreprocessedCase], *, mode: str, patch_size: Sequence[int],
             num_classes: int, device: torch.device | str = "cpu", amp: bool = False) -> np.ndarray:
    """Mean Dice per foreground class over ``cases`` (NaN-aware). Restores the model's train mode."""
    was_training = model.training
    scores = []
    for case in cases:
        probs = predict_probabilities(model, case.load_image(), mode=mode, patch_size=patch_size,
                                      device=device, amp=amp)
        label = torch.from_numpy(np.array(case.load_label()[0]))
        scores.append(dice_per_class(probs.argmax(0), label, num_classes))
    model.train(was_training)
    if not scores:
        return np.full(num_classes - 1, np.nan)
    with warnings.catch_warnings():  # a class absent from every case stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(scores), axis=0)
