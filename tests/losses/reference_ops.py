"""Reference helpers shared by the loss tests in this folder.

Everything here is an independent float64 re-implementation written with explicit loops (or, for
the input builders, plain torch random tensors); nothing calls into ``medkd``, so the tests compare
the library against code that does not share its implementation.

Imported by the test modules as ``from reference_ops import ...``: pytest's default ``prepend``
import mode puts this folder on ``sys.path`` (the test folders have no ``__init__.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def linear_1d(values: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Independent float64 reference, explicit loop (not medkd): linear resampling along ``axis``
    to ``out`` samples with PyTorch's align_corners=False source coordinates."""
    size = values.shape[axis]
    moved = np.moveaxis(values, axis, 0)
    result = np.zeros((out, *moved.shape[1:]))
    for i in range(out):
        src = max((i + 0.5) * size / out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size - 1)
        i1 = min(i0 + 1, size - 1)
        lam = src - i0
        result[i] = (1 - lam) * moved[i0] + lam * moved[i1]
    return np.moveaxis(result, 0, axis)


def resize_linear(x: np.ndarray, size) -> np.ndarray:
    """Independent float64 reference, explicit loops (not medkd): separable (bi/tri)linear resize of
    ``(K, *spatial)`` to ``size`` with align_corners=False; axes already at their size are untouched."""
    for axis, out in enumerate(size):
        if x.shape[axis + 1] != out:
            x = linear_1d(x, axis + 1, out)
    return x


def adapt_conv1x1(feat: np.ndarray, conv) -> np.ndarray:
    """Independent float64 reference, explicit loops (not medkd): apply a 1x1 conv voxel by voxel to
    ``(K, *spatial)``. ``conv`` without a ``weight`` (``None`` or ``nn.Identity``) means identity."""
    if not hasattr(conv, "weight"):
        return feat
    w = conv.weight.detach().double().numpy().reshape(conv.out_channels, conv.in_channels)
    b = conv.bias.detach().double().numpy()
    out = np.zeros((conv.out_channels, *feat.shape[1:]))
    for pos in np.ndindex(*feat.shape[1:]):
        for o in range(conv.out_channels):
            out[(o, *pos)] = b[o] + sum(w[o, k] * feat[(k, *pos)] for k in range(conv.in_channels))
    return out


def nearest_label(label: np.ndarray, size) -> np.ndarray:
    """Independent reference, explicit loop (not medkd): nearest downsampling of ``label (*spatial)``
    to ``size`` with source index floor(i * in / out), as PyTorch's ``mode="nearest"``."""
    out = np.zeros(size, dtype=np.int64)
    for pos in np.ndindex(*size):
        src = tuple(int(math.floor(i * n_in / n_out)) for i, n_in, n_out in zip(pos, label.shape, size))
        out[pos] = label[src]
    return out


def upsample2(x: torch.Tensor, axes_from: int = 2) -> torch.Tensor:
    """Independent reference (not medkd): exact nearest 2x upsampling by repeating every entry twice
    along each axis from ``axes_from`` on (default: the spatial axes of ``(B, C, *spatial)``)."""
    for axis in range(axes_from, x.ndim):
        x = x.repeat_interleave(2, dim=axis)
    return x


def two_scale_features(gen: torch.Generator, full, half):
    """Independent float64 test inputs (plain torch random tensors, not medkd), drawn from ``gen`` in
    this order: student (3 ch at ``half``, 4 ch at ``half``), teacher (5 ch at ``full``, 4 ch at ``half``),
    batch 2."""
    student = [torch.randn(2, 3, *half, generator=gen, dtype=torch.float64),
               torch.randn(2, 4, *half, generator=gen, dtype=torch.float64)]
    teacher = [torch.randn(2, 5, *full, generator=gen, dtype=torch.float64),
               torch.randn(2, 4, *half, generator=gen, dtype=torch.float64)]
    return student, teacher
