"""Segmentation metrics of one case, computed with MONAI.

Dice, the 95th-percentile Hausdorff distance (HD95) and the average symmetric
surface distance (ASD) come from :mod:`monai.metrics`; this module only builds
one-hot tensors and applies the empty-mask conventions below. Aggregating cases is
:mod:`medkd.evaluation.results`; scoring a folder of predictions, :mod:`medkd.evaluation.folder`.

Conventions for one foreground class of one case:

* both reference and prediction empty: ``dice = 1.0``, ``hd95 = 0.0``, ``asd = 0.0``
  (a correct "nothing there");
* exactly one of them empty: ``dice = 0.0``; ``hd95`` and ``asd`` are ``NaN``.
  The true distance is infinite; it is reported as missing, and summaries count
  these cases in ``n_missing`` instead of silently averaging over them;
* otherwise the MONAI values; distances are in the units of ``spacing``
  (millimetres for medical images), with unit spacing when none is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)

__all__ = ["BACKGROUND", "METRIC_NAMES", "MEAN_FOREGROUND", "case_metrics"]

#: Metrics reported per case and class, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "asd")
#: Key of the summary entry that averages the per-class means.
MEAN_FOREGROUND = "mean_foreground"
#: Label value that is always allowed and never scored.
BACKGROUND = 0

# MONAI warns about empty masks (callers never pass any) and, internally, about its own deprecated
# get_mask_edges argument; neither concerns the caller. Filters set once here, not per call: scoring runs
# in threads, and ``warnings.catch_warnings`` is not thread-safe (another thread's exit restored them early).
warnings.filterwarnings("ignore", message=".*is all 0.*", category=UserWarning)
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)


def _check_spacing(spacing_zyx: Sequence[float] | None, ndim: int) -> list[float] | None:
    """Return ``spacing_zyx`` as a list of positive floats matching ``ndim``, or ``None``."""
    if spacing_zyx is None:
        return None
    spacing = [float(s) for s in spacing_zyx]
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values but the arrays have {ndim} dimensions")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing values must be positive and finite, got {tuple(spacing)}")
    return spacing


def _one_hot(label: np.ndarray, class_values: Sequence[int]) -> torch.Tensor:
    """Binary masks of ``class_values`` as a float tensor of shape ``(1, C, *label.shape)``."""
    masks = np.stack([label == value for value in class_values])
    return torch.from_numpy(masks[None]).float()


def _surface_distances(
    pred_oh: torch.Tensor, ref_oh: torch.Tensor, spacing: list[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and symmetric ASD per channel via MONAI; every channel must be non-empty in both."""
    hd95 = compute_hausdorff_distance(pred_oh, ref_oh, include_background=True, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(pred_oh, ref_oh, include_background=True, symmetric=True, spacing=spacing)
    return hd95[0].cpu().numpy().astype(float), asd[0].cpu().numpy().astype(float)


def _check_label_maps(pred: np.ndarray, ref: np.ndarray, class_values: Sequence[int]) -> list[int]:
    """``class_values`` as ints; ValueError for differing shapes, 0-d maps, or empty / duplicated values."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim == 0:
        raise ValueError("label maps must have at least one dimension")
    values = [int(v) for v in class_values]
    if not values:
        raise ValueError("class_values is empty: nothing to evaluate")
    if len(set(values)) != len(values):
        raise ValueError(f"class_values has duplicates: {values}")
    return values


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    class_values: Sequence[int],
    spacing_zyx: Sequence[float] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 and ASD of each foreground class between two label maps.

    Args:
        pred: predicted label map, integer labels, numpy axis order.
        ref: reference label map of the same shape.
        class_values: label values to score (foreground; ``0`` is not special here,
            but callers normally leave background out).
        spacing_zyx: voxel size in numpy axis order, ``(z, y, x)`` or ``(y, x)``, so
            distances come out in millimetres; ``None`` means unit spacing.

    Returns:
        ``{value: {"dice", "hd95", "asd", "ref_voxels", "pred_voxels"}}`` for each
        value in ``class_values``. See the module docstring for the empty-mask
        conventions (both empty: 1/0/0; one empty: 0/NaN/NaN).

    Raises:
        ValueError: shapes differ, the arrays are 0-d, ``class_values`` is empty or
            has duplicates, or ``spacing_zyx`` does not fit the arrays.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    values = _check_label_maps(pred, ref, class_values)
    spacing = _check_spacing(spacing_zyx, ref.ndim)

    pred_oh, ref_oh = _one_hot(pred, values), _one_hot(ref, values)
    dice = compute_dice(pred_oh, ref_oh, include_background=True, ignore_empty=False)[0].cpu().numpy()
    pred_voxels = pred_oh[0].flatten(1).sum(dim=1).long().tolist()
    ref_voxels = ref_oh[0].flatten(1).sum(dim=1).long().tolist()

    hd95 = np.full(len(values), math.nan)
    asd = np.full(len(values), math.nan)
    both = [i for i in range(len(values)) if pred_voxels[i] > 0 and ref_voxels[i] > 0]
    neither = [i for i in range(len(values)) if pred_voxels[i] == 0 and ref_voxels[i] == 0]
    hd95[neither] = 0.0
    asd[neither] = 0.0
    if both:
        hd95[both], asd[both] = _surface_distances(pred_oh[:, both], ref_oh[:, both], spacing)

    return {
        value: {
            "dice": float(dice[i]),
            "hd95": float(hd95[i]),
            "asd": float(asd[i]),
            "ref_voxels": int(ref_voxels[i]),
            "pred_voxels": int(pred_voxels[i]),
        }
        for i, value in enumerate(values)
    }
