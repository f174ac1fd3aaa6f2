"""What ``medkd predict`` does around the network, in numpy (no PyTorch, no MONAI).

Re-implements, for the bundle predictor:

* the per-case preprocessing of :func:`medkd.data.preprocess.preprocess_arrays` (crop to the non-zero
  bounding box, linear resampling to the target spacing, normalisation) and its inverse
  :func:`medkd.data.preprocess.restore_probabilities`; resampling is PyTorch's ``interpolate``
  (``align_corners=False``, no anti-aliasing) as MONAI's ``Resize`` calls it, done axis by axis;
* MONAI's ``sliding_window_inference`` with Gaussian blending (``sigma_scale`` 0.125, windows
  placed as ``dense_patch_slices`` places them, inputs smaller than the window zero-padded centred)
  and the whole-slice forward of :func:`medkd.models.forward_padded`;
* :func:`medkd.engine.inference.predict_probabilities`: 2D models slice by slice, softmax of the
  blended logits, optional mirroring test-time augmentation.

Arrays carry a channel axis first and three spatial axes ``(z, y, x)`` (a native 2D image is one
slice, z = 1), as in :mod:`medkd.data.preprocess`. ``tests/deploy/test_ops.py`` checks each piece
against the PyTorch original.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np

from medkd.data.grid import nonzero_bbox, spacing_zyx, window_starts
from medkd.data.io import Geometry

__all__ = ["gaussian_importance", "nonzero_bbox", "predict_probabilities", "preprocess", "resize_linear",
           "restore", "sliding_window", "window_starts"]

#: a network run: (B, C, *spatial) float32 -> (B, K, *spatial) logits
Network = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------ preprocessing


def _target_shape(shape: Sequence[int], spacing: Sequence[float], plan: dict[str, Any]) -> list[int]:
    if not plan.get("target_spacing"):
        return list(shape)
    target = list(plan["target_spacing"])[-3:]
    target = [spacing[0]] * (3 - len(target)) + target
    if plan["mode"] == "2d":  # slices stay slices
        target[0] = spacing[0]
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def _linear_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` to ``size`` samples (half-pixel centres, edges clamped)."""
    n = array.shape[axis]
    if n == size:
        return array
    scale = np.float32(n / size)
    src = np.maximum((np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = size
    w_hi = np.clip(src - lo, 0, 1).astype(np.float32).reshape(shape)
    return np.take(array, lo, axis) * (1 - w_hi) + np.take(array, hi, axis) * w_hi


def resize_linear(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(C, *spatial) float32 resampled to spatial ``shape`` ((bi/tri)linear, ``align_corners=False``)."""
    out = array.astype(np.float32, copy=False)
    for axis, size in enumerate(shape, start=1):
        out = _linear_axis(out, axis, int(size))
    return out


def normalize(image: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """Per channel of (C, *spatial): ``ct`` (clip, dataset mean/std), ``zscore`` (case mean/std) or ``none``."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(plan["normalization"]):
        channel = image[c].astype(np.float32)
        if scheme == "ct":
            stats = plan["ct_stats"][c]
            channel = (np.clip(channel, stats["lower"], stats["upper"]) - stats["mean"]) / max(stats["std"], 1e-8)
        elif scheme == "zscore":
            channel = (channel - channel.mean()) / max(float(channel.std()), 1e-8)
        out[c] = channel
    return out


def preprocess(image: np.ndarray, geometry: Geometry, plan: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The plan applied to one image (C, *spatial), spatial (z, y, x) or (y, x).

    Returns the network's input (C, z, y, x) float32 and what :func:`restore` needs (crop box,
    cropped shape, whether the image was native 2D).
    """
    native_2d = image.ndim == 3
    if native_2d:
        if plan["mode"] == "3d":
            raise ValueError("a 2D image cannot be used with a 3d model")
        image = image[:, None]
    spacing = spacing_zyx(geometry, image.ndim - 1)
    bbox = nonzero_bbox(image) if plan["crop_nonzero"] else [[0, s] for s in image.shape[1:]]
    image = image[(slice(None), *(slice(lo, hi) for lo, hi in bbox))]
    target = _target_shape(image.shape[1:], spacing, plan)
    prepared = normalize(resize_linear(image.astype(np.float32), target), plan)
    return prepared, {"native_2d": native_2d, "crop_bbox": bbox, "cropped_shape": [hi - lo for lo, hi in bbox]}


def restore(probabilities: np.ndarray, props: dict[str, Any], original_shape: Sequence[int]) -> np.ndarray:
    """(K, z, y, x) on the network's grid -> (K, *original_shape); background 1 outside the crop."""
    restored = resize_linear(probabilities, props["cropped_shape"])
    full_shape = [1, *original_shape] if props["native_2d"] else list(original_shape)
    out = np.zeros((probabilities.shape[0], *full_shape), dtype=np.float32)
    out[0] = 1.0
    out[(slice(None), *(slice(lo, hi) for lo, hi in props["crop_bbox"]))] = restored
    return out[:, 0] if props["native_2d"] else out


# ------------------------------------------------------------------------------------ the network


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian window weights of shape ``patch`` (float32, peak 1, floored at max(min, 1e-3))."""
    weights = np.ones((), dtype=np.float32)
    for size in patch:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x ** 2 / np.float32(-2 * (size * sigma_scale) ** 2)).astype(np.float32)
        weights = weights[..., None] * g
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window(network: Network, image: np.ndarray, patch: Sequence[int], *, overlap: float = 0.5,
                   batch_size: int = 8, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian-blended logits (B, K, *spatial) of windows of ``patch`` over ``image`` (B, C, *spatial)."""
    spatial = image.shape[2:]
    pads = [((p - s) // 2, p - s - (p - s) // 2) if p > s else (0, 0) for s, p in zip(spatial, patch)]
    padded = np.pad(image, [(0, 0), (0, 0), *pads]) if any(sum(p) for p in pads) else image
    size = padded.shape[2:]
    starts = [window_starts(s, p, overlap) for s, p in zip(size, patch)]
    windows = [tuple(slice(a, a + p) for a, p in zip(corner, patch)) for corner in itertools.product(*starts)]
    weights = gaussian_importance(patch, sigma_scale)
    count = np.zeros(size, dtype=np.float32)
    for window in windows:
        count[window] += weights
    jobs = [(b, w) for b in range(image.shape[0]) for w in windows]
    out = None
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        logits = network(np.ascontiguousarray(np.stack([padded[(b, slice(None), *w)] for b, w in chunk])))
        if out is None:
            out = np.zeros((image.shape[0], logits.shape[1], *size), dtype=np.float32)
        for (b, w), item in zip(chunk, logits):
            out[(b, slice(None), *w)] += item * weights
    out /= count
    return out[(slice(None), slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial)))]


def forward_padded(network: Network, x: np.ndarray, divisor: int) -> np.ndarray:
    """``network`` on ``x`` (B, C, *spatial) zero-padded centred to multiples of ``divisor``, cropped back."""
    amounts = [((-s) % divisor // 2, (-s) % divisor - (-s) % divisor // 2) for s in x.shape[2:]]
    if not any(a or b for a, b in amounts):
        return network(x)
    out = network(np.pad(x, [(0, 0), (0, 0), *amounts]))
    return out[(slice(None), slice(None), *(slice(a, a + s) for (a, _), s in zip(amounts, x.shape[2:])))]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _mirrored_softmax(run: Network, batch: np.ndarray, tta: bool) -> np.ndarray:
    axes = range(2, batch.ndim)
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if tta else [()]
    total = None
    for flip in flips:
        x = np.ascontiguousarray(np.flip(batch, flip)) if flip else batch
        probs = _softmax(run(x).astype(np.float32))
        probs = np.flip(probs, flip) if flip else probs
        total = probs if total is None else total + probs
    return total / len(flips)


def predict_probabilities(network: Network, image: np.ndarray, *, mode: str, patch_size: Sequence[int],
                          tta: bool = False, batch_size: int = 8, overlap: float = 0.5, whole_slice: bool = False,
                          divisor: int = 1) -> np.ndarray:
    """Softmax probabilities (K, z, y, x) of a preprocessed image (C, z, y, x), as PyTorch inference does.

    2D mode predicts batches of ``batch_size`` slices, whole (padded to multiples of ``divisor``) with
    ``whole_slice``, else with the sliding window; 3D mode slides a 3D window. ``tta`` averages the
    softmax over all mirrorings of the spatial axes.
    """
    def window(x: np.ndarray) -> np.ndarray:
        return sliding_window(network, x, patch_size, overlap=overlap, batch_size=batch_size)

    image = np.ascontiguousarray(image, dtype=np.float32)
    if mode == "2d":
        run = (lambda x: forward_padded(network, x, divisor)) if whole_slice else window
        slices = image.transpose(1, 0, 2, 3)
        chunks = [_mirrored_softmax(run, np.ascontiguousarray(slices[i:i + batch_size]), tta)
                  for i in range(0, slices.shape[0], batch_size)]
        return np.ascontiguousarray(np.concatenate(chunks).transpose(1, 0, 2, 3))
    if mode == "3d":
        return _mirrored_softmax(window, image[None], tta)[0]
    raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
