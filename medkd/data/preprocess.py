"""nnU-Net-style preprocessing (its on-disk cache is :mod:`medkd.data.store`).

Per case, in this order (as nnU-Net does):

1. crop to the bounding box of non-zero voxels (any channel), when ``crop_nonzero``;
2. resample to ``target_spacing`` (numpy axis order; in 2D mode only the in-plane axes), images
   linearly and labels with nearest neighbour (MONAI ``Resize``);
3. normalise each channel: ``zscore`` per case, ``(x - mean) / std``; ``ct``: clip to the
   dataset's 0.5/99.5 foreground percentiles, then z-score with the dataset's foreground mean/std;
   ``none`` leaves intensities as they are. ``auto`` picks ``ct`` for channels named CT, else z-score.

A plan with an ``nnunet`` entry (an imported nnU-Net teacher's, :mod:`medkd.data.nnunet_plans`)
runs nnU-Net's own preprocessing instead (:mod:`medkd.data.nnunet_preprocess`: axis transpose, crop
to non-zero, normalisation per the plans' schemes, nnU-Net's resampling), and its inverse.

Arrays always carry a leading channel axis and three spatial axes (z, y, x); a native 2D image is
stored as one slice (z = 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import Resize

from medkd.data.dataset import Case, DatasetInfo
from medkd.data.grid import nonzero_bbox, spacing_zyx
from medkd.data.nnunet_preprocess import nnunet_to_preprocessed_grid, preprocess_nnunet, restore_nnunet_probabilities
from medkd.data.io import Geometry

log = logging.getLogger(__name__)

PLAN_VERSION = 1
MAX_LOCATIONS_PER_CLASS = 10_000
CT_SAMPLES_PER_CASE = 10_000


@dataclass
class PreprocessingPlan:
    """Everything that determines the preprocessed arrays; stored in every checkpoint."""

    mode: str  # "2d" or "3d"
    normalization: list[str]  # per channel: "zscore", "ct" or "none"
    ct_stats: list[dict[str, float] | None]  # per channel: lower, upper, mean, std
    target_spacing: list[float] | None  # numpy order
    crop_nonzero: bool
    num_channels: int
    version: int = PLAN_VERSION
    nnunet: dict[str, Any] | None = None  # nnU-Net's preprocessing (imported teachers); None: medkd's

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["nnunet"] is None:  # absent, so plans (and cache keys) made before the key existed are unchanged
            del data["nnunet"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessingPlan":
        return cls(**data)

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PreprocessedCase:
    case_id: str
    image_path: Path
    label_path: Path | None
    locations_path: Path | None
    properties: dict[str, Any] = field(default_factory=dict)

    def load_image(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.image_path, mmap_mode="r" if mmap else None)

    def load_label(self, mmap: bool = True) -> np.ndarray | None:
        return None if self.label_path is None else np.load(self.label_path, mmap_mode="r" if mmap else None)

    def load_locations(self) -> dict[int, np.ndarray]:
        """Sampled voxel coordinates (N, 3) of each foreground class present, for oversampling."""
        if self.locations_path is None:
            return {}
        with np.load(self.locations_path) as data:
            return {int(key[1:]): data[key] for key in data.files}


# --------------------------------------------------------------------------------------------
# planning


def _normalization_for(channel_name: str, requested: str) -> str:
    if requested != "auto":
        return requested
    return "ct" if channel_name.strip().upper() == "CT" else "zscore"


def _ct_statistics(dataset: DatasetInfo, cases: Sequence[Case], channel: int, seed: int = 0) -> dict[str, float]:
    """Foreground intensity statistics of one channel over ``cases`` (nnU-Net's CT scheme)."""
    rng = np.random.default_rng(seed)
    samples = []
    for case in cases:
        image, label, _ = read_case(case, dataset)
        values = image[channel][label > 0] if label is not None else image[channel].ravel()
        if values.size:
            samples.append(rng.choice(values, size=min(values.size, CT_SAMPLES_PER_CASE), replace=False))
    if not samples:
        raise ValueError(f"no foreground voxels to compute CT statistics for channel {channel} of {dataset.root}")
    pooled = np.concatenate(samples).astype(np.float64)
    lower, upper = np.percentile(pooled, [0.5, 99.5])
    clipped = np.clip(pooled, lower, upper)
    return {"lower": float(lower), "upper": float(upper), "mean": float(clipped.mean()), "std": float(clipped.std())}


def make_plan(dataset: DatasetInfo, train_cases: Sequence[Case], *, mode: str, normalization: str = "auto",
              target_spacing: Sequence[float] | None = None, crop_nonzero: bool = True) -> PreprocessingPlan:
    schemes = [_normalization_for(dataset.channel_names.get(c, ""), normalization) for c in range(dataset.num_channels)]
    stats = [_ct_statistics(dataset, train_cases, c) if s == "ct" else None for c, s in enumerate(schemes)]
    return PreprocessingPlan(mode=mode, normalization=schemes, ct_stats=stats,
                             target_spacing=list(target_spacing) if target_spacing else None,
                             crop_nonzero=crop_nonzero, num_channels=dataset.num_channels)


# --------------------------------------------------------------------------------------------
# the per-case transform and its inverse


def _target_shape(shape: Sequence[int], spacing: Sequence[float], plan: PreprocessingPlan) -> list[int]:
    if not plan.target_spacing:
        return list(shape)
    target = list(plan.target_spacing)[-3:]
    target = [spacing[0]] * (3 - len(target)) + target
    if plan.mode == "2d":  # slices stay slices
        target[0] = spacing[0]
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def _resize(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resize (C, z, y, x) to spatial ``shape``; in-plane only when z is unchanged (2D mode)."""
    if list(array.shape[1:]) == list(shape):
        return array
    if shape[0] == array.shape[1]:  # resample slices in 2D: z folds into the channel axis
        c, z = array.shape[:2]
        flat = array.reshape(c * z, *array.shape[2:])
        resized = Resize(shape[1:], mode=_mode_2d(mode))(torch.as_tensor(flat))
        return np.asarray(resized).reshape(c, z, *shape[1:])
    return np.asarray(Resize(shape, mode=mode)(torch.as_tensor(array)))


def _mode_2d(mode: str) -> str:
    return {"trilinear": "bilinear"}.get(mode, mode)


def normalize(image: np.ndarray, plan: PreprocessingPlan) -> np.ndarray:
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(plan.normalization):
        channel = image[c].astype(np.float32)
        if scheme == "ct":
            stats = plan.ct_stats[c]
            channel = (np.clip(channel, stats["lower"], stats["upper"]) - stats["mean"]) / max(stats["std"], 1e-8)
        elif scheme == "zscore":
            channel = (channel - channel.mean()) / max(float(channel.std()), 1e-8)
        out[c] = channel
    return out


def preprocess_arrays(image: np.ndarray, label: np.ndarray | None, geometry: Geometry,
                      plan: PreprocessingPlan) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Apply the plan to one case.

    Args:
        image: (C, *spatial) with spatial (z, y, x) or (y, x) for a native 2D image.
        label: (*spatial) integer labels or None.
    Returns:
        image (C, z, y, x) float32, label (1, z, y, x) int16 or None, and the properties needed to
        map a prediction back onto the original grid (:func:`restore_probabilities`).
    """
    if plan.nnunet is not None:
        if plan.mode == "3d" and image.ndim == 3:
            raise ValueError("a 2D image cannot be used with a 3D nnU-Net configuration")
        return preprocess_nnunet(image, label, geometry, plan.nnunet)
    original_shape = list(image.shape[1:])
    native_2d = image.ndim == 3
    if native_2d:
        if plan.mode == "3d":
            raise ValueError("a 2D image cannot be used with data.mode=3d")
        image, label = image[:, None], (None if label is None else label[None])
    spacing = spacing_zyx(geometry, image.ndim - 1)
    bbox = nonzero_bbox(image) if plan.crop_nonzero else [[0, s] for s in image.shape[1:]]
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    image = image[(slice(None), *crop)]
    label = None if label is None else label[crop][None]
    target_shape = _target_shape(image.shape[1:], spacing, plan)
    image = normalize(_resize(image.astype(np.float32), target_shape, "trilinear"), plan)
    if label is not None:
        label = _resize(label.astype(np.float32), target_shape, "nearest").round().astype(np.int16)
    props = {
        "original_shape": original_shape,
        "native_2d": native_2d,
        "geometry": geometry.to_dict(),
        "spacing_zyx": spacing,
        "crop_bbox": bbox,
        "cropped_shape": [hi - lo for lo, hi in bbox],
        "shape": list(image.shape[1:]),
    }
    return image, label, props


def restore_probabilities(probabilities: np.ndarray, props: dict[str, Any], original_shape: Sequence[int]) -> np.ndarray:
    """Undo resampling and cropping: (K, z, y, x) on the preprocessed grid -> (K, *original_shape).

    Outside the crop the background class gets probability 1. ``original_shape`` is the image's
    spatial shape as read ((y, x) for native 2D images, whose result is returned 2D).
    """
    if props.get("nnunet"):
        return restore_nnunet_probabilities(probabilities, props, original_shape)
    restored = _resize(probabilities.astype(np.float32), props["cropped_shape"], "trilinear")
    full_shape = [1, *original_shape] if props["native_2d"] else list(original_shape)
    out = np.zeros((probabilities.shape[0], *full_shape), dtype=np.float32)
    out[0] = 1.0
    crop = tuple(slice(lo, hi) for lo, hi in props["crop_bbox"])
    out[(slice(None), *crop)] = restored
    return out[:, 0] if props["native_2d"] else out


def to_preprocessed_grid(probabilities: np.ndarray, props: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`restore_probabilities`: (K, *original shape) -> (K, z, y, x) on the grid of the
    case whose preprocessing gave ``props`` (crop, then linear resampling); how a teacher's output on the
    original grid is put onto a student's preprocessed grid."""
    if props.get("nnunet"):
        return nnunet_to_preprocessed_grid(probabilities, props)
    array = probabilities[:, None] if props["native_2d"] else probabilities
    array = array[(slice(None), *(slice(lo, hi) for lo, hi in props["crop_bbox"]))]
    return _resize(np.ascontiguousarray(array, dtype=np.float32), props["shape"], "trilinear")


def class_locations(label: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Up to MAX_LOCATIONS_PER_CLASS voxel coordinates (z, y, x) of each foreground class."""
    rng = np.random.default_rng(seed)
    locations = {}
    for value in np.unique(label):
        if value == 0:
            continue
        coords = np.argwhere(label[0] == value)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False)]
        locations[int(value)] = coords.astype(np.int32)
    return locations
