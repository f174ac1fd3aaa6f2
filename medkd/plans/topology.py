"""Network topology from spacing and patch size: pooling per axis (nnU-Net's rule, re-implemented).

Starting from the target spacing, each stage halves every axis whose current spacing is within 2x of
the finest current spacing and whose feature map is still at least ``2 * min_edge`` voxels (a lone
axis needs ``3 * min_edge``), up to :data:`MAX_POOLS` per axis; other axes keep their resolution. So an anisotropic axis (ACDC's 10 mm
slices) is pooled only once the in-plane axes have caught up with its spacing. The patch is then
padded up to a multiple of each axis' total stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MIN_FEATURE_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length
#: at most this many poolings per axis: medkd probes a network's stages on 64^2 (2D) and 32^3 (3D) inputs
#: (feature taps, whole-slice padding), which must keep 2 voxels at the bottleneck
MAX_POOLS = {2: 5, 3: 4}


@dataclass(frozen=True)
class Topology:
    """``strides[i]`` is the per-axis pooling of stage ``i + 1`` (stage 0 has stride 1); ``divisor`` the total
    stride of each axis, which the patch size must be a multiple of."""

    strides: tuple[tuple[int, ...], ...]
    pools_per_axis: tuple[int, ...]
    patch_size: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides) + 1

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(2 ** n for n in self.pools_per_axis)


def pooling(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = MIN_FEATURE_EDGE,
            max_stages: int = 7) -> tuple[list[list[int]], list[int]]:
    """Per-stage strides (each a list of 1 or 2 per axis) and the number of poolings per axis (at most
    :data:`MAX_POOLS`)."""
    if len(spacing) != len(patch_size) or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing {list(spacing)} must be positive with one entry per patch axis {list(patch_size)}")
    current_spacing, current_size = list(map(float, spacing)), list(map(float, patch_size))
    strides: list[list[int]] = []
    pools = [0] * len(spacing)
    while len(strides) + 1 < max_stages:
        max_pools = MAX_POOLS.get(len(spacing), 5)
        axes = [i for i in range(len(spacing)) if current_size[i] >= 2 * min_edge and pools[i] < max_pools]
        if not axes:
            break
        finest = min(current_spacing[i] for i in axes)
        axes = [i for i in axes if current_spacing[i] / finest < 2]
        if len(axes) == 1 and current_size[axes[0]] < 3 * min_edge:
            break
        stride = [2 if i in axes else 1 for i in range(len(spacing))]
        for i in axes:
            pools[i] += 1
            current_spacing[i] *= 2
            current_size[i] = math.ceil(current_size[i] / 2)
        strides.append(stride)
    return strides, pools


def pad_to_multiple(shape: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """Each entry rounded up to a multiple of its divisor."""
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))


def topology(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = MIN_FEATURE_EDGE,
             max_stages: int = 7) -> Topology:
    """Strides for ``patch_size`` at ``spacing`` and the patch padded to a multiple of the total stride."""
    strides, pools = pooling(spacing, patch_size, min_edge, max_stages)
    padded = pad_to_multiple(patch_size, [2 ** n for n in pools])
    return Topology(tuple(tuple(s) for s in strides), tuple(pools), padded)


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    """nnU-Net's starting patch: the aspect ratio of the spacing's inverse, scaled to 256^3 voxels (3D) or
    2048^2 pixels (2D), clipped to the median image shape."""
    inverse = [1.0 / s for s in spacing]
    volume = (256 ** 3) if len(spacing) == 3 else (2048 ** 2)
    scale = (volume / math.prod(inverse)) ** (1.0 / len(spacing))
    return [max(1, min(round(i * scale), int(round(m)))) for i, m in zip(inverse, median_shape)]


def reduce_patch(patch_size: Sequence[int], median_shape: Sequence[float], spacing: Sequence[float],
                 floor: Sequence[int]) -> tuple[int, ...] | None:
    """One reduction step (nnU-Net): the axis largest relative to the median shape shrinks by its current
    total stride (then the patch is padded to the new topology's multiple); an axis at ``floor``, or one
    that padding would bring back to its size, leaves the turn to the next. None when no axis can shrink."""
    divisor = topology(spacing, patch_size).divisor
    order = sorted(range(len(patch_size)), key=lambda i: patch_size[i] / median_shape[i], reverse=True)
    for axis in order:
        if patch_size[axis] <= floor[axis]:
            continue
        smaller = list(patch_size)
        smaller[axis] = max(floor[axis], smaller[axis] - divisor[axis])
        padded = topology(spacing, smaller).patch_size
        if padded[axis] < patch_size[axis]:
            return padded
    return None
