"""Numpy-only helpers on a case's voxel grid, shared by preprocessing and the torch-free bundle predictor."""

from __future__ import annotations

import math

import numpy as np

from medkd.data.io import Geometry


def spacing_zyx(geometry: Geometry, ndim: int) -> list[float]:
    """SimpleITK spacing (x, y, z) in numpy order, padded to 3 axes for native 2D images."""
    spacing = list(reversed(geometry.spacing))
    spacing = spacing[-ndim:] if ndim <= len(spacing) else spacing
    return ([1.0] * (3 - len(spacing)) + spacing)[-3:]


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box [[lo, hi), ...] over the spatial axes of voxels non-zero in any channel of (C, *spatial)."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return [[0, s] for s in mask.shape]
    bbox = []
    for axis in range(mask.ndim):
        nonzero = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bbox.append([int(nonzero[0]), int(nonzero[-1]) + 1])
    return bbox


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis of ``size`` (>= ``patch``), as MONAI's ``dense_patch_slices``."""
    interval = patch if patch == size else max(int(patch * (1 - overlap)), 1)
    count = next((d + 1 for d in range(math.ceil(size / interval)) if d * interval + patch >= size), 1)
    return [i * interval - max(i * interval + patch - size, 0) for i in range(count)]
