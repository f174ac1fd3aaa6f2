"""Whole-input forward passes: zero-pad to a multiple of the network's largest stride, crop back.

A fully convolutional encoder-decoder with ``n`` down-samplings by 2 only accepts spatial sizes
divisible by ``2**n`` (its *largest stride*). :func:`forward_padded` runs such a network on an input
of any size by zero-padding every spatial axis, centred, up to the next multiple of ``divisor`` and
cropping the output back to the input's size, so a whole 2D slice is predicted in one forward
instead of by a sliding window. Zero is the mean intensity of a z-scored image.

Used by 2D inference (:func:`medkd.engine.inference.predict_probabilities`) and by the
teacher-output cache (:mod:`medkd.teachers.cache`).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medkd.models.tracing import list_tappable

__all__ = ["forward_padded", "largest_stride", "pad_amounts"]

#: dummy input edge used to measure strides, per number of spatial dims
_PROBE_SIZE = {2: 64, 3: 32}

_STRIDES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], int]]" = weakref.WeakKeyDictionary()


def largest_stride(model: nn.Module, spatial_dims: int, in_channels: int) -> int:
    """The largest down-sampling factor of any module of ``model`` (1 for a network that never down-samples).

    Measured once per model (and per ``spatial_dims``/``in_channels``) by one eval-mode forward of
    a dummy input ``(1, in_channels, 64, 64)`` in 2D or ``(1, in_channels, 32, 32, 32)`` in 3D
    (:func:`medkd.models.taps.list_tappable`); later calls return the cached value.
    """
    per_model = _STRIDES.setdefault(model, {})
    key = (spatial_dims, in_channels)
    if key not in per_model:
        size = _PROBE_SIZE.get(spatial_dims, 32)
        rows = list_tappable(model, (1, in_channels, *([size] * spatial_dims)))
        strides = [int(max(row["stride"])) for row in rows if row.get("stride")]
        per_model[key] = max([1, *strides])
    return per_model[key]


def pad_amounts(size: int, divisor: int) -> tuple[int, int]:
    """``(before, after)`` zeros that bring ``size`` to the next multiple of ``divisor`` (centred)."""
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    total = (-size) % divisor
    return total // 2, total - total // 2


def forward_padded(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, divisor: int) -> torch.Tensor:
    """``model`` applied to ``x`` ``(B, C, *spatial)`` zero-padded to a multiple of ``divisor``, cropped back.

    Every spatial axis is padded centred (one more zero after than before when the amount is odd).
    The output's trailing spatial axes are cropped to ``x``'s spatial size, so plain logits
    ``(B, K, *spatial)`` and deep-supervision stacks ``(B, H, K, *spatial)`` both come back on the
    input's grid. An input already divisible by ``divisor`` is passed through unpadded.
    """
    spatial = x.shape[2:]
    amounts = [pad_amounts(int(s), divisor) for s in spatial]
    if not any(before or after for before, after in amounts):
        return model(x)
    flat = [p for before_after in reversed(amounts) for p in before_after]  # F.pad: last axis first
    out = model(F.pad(x, flat))
    crop = tuple(slice(before, before + int(s)) for (before, _), s in zip(amounts, spatial))
    return out[(..., *crop)]
