r"""nnU-Net v2's preprocessing and its inverse, re-implemented with numpy/scipy (no nnunetv2 needed).

For an imported nnU-Net teacher (plan entry of :func:`medkd.data.nnunet_plans.preprocessing_entry`),
per case, in nnU-Net's order (``DefaultPreprocessor.run_case_npy``):

1. ``transpose_forward`` of the spatial axes (and of the spacing);
2. crop to the bounding box of the non-zero mask (non-zero in any channel, holes filled);
3. normalise each channel *before* resampling: ``ZScoreNormalization`` ``(x - mean) / max(std, 1e-8)``
   over the case, or over the non-zero mask only with ``use_mask_for_norm`` (outside left as is);
   ``CTNormalization`` clip to the fingerprint's foreground ``[percentile_00_5, percentile_99_5]``,
   then ``(x - mean) / max(std, 1e-8)`` with its foreground mean/std; ``RescaleTo01Normalization``
   ``(x - min) / max(max - min, 1e-8)``; ``RGBTo01Normalization`` ``x / 255``; ``NoNormalization``;
4. resample to the configuration's spacing (2D: in-plane only), ``resample_data_or_seg_to_shape``:
   spline order 3 for images, 1 for probabilities, per-label order 1 (argmax of the indicators) for labels, and
   for anisotropic spacing (max/min > 3) in-plane first, then order 0 (nearest) along the low-resolution axis.

Resizing equals ``skimage.transform.resize(x, shape, order, mode="edge", anti_aliasing=False)``:
``scipy.ndimage.zoom(x, shape / x.shape, order, mode="nearest", grid_mode=True)`` clipped to the
input's range. :func:`restore_nnunet_probabilities` maps probabilities back as nnU-Net maps logits:
resample to the cropped shape (probability kwargs), softmax, background 1 outside the crop,
``transpose_backward``. It resamples ``log p``, which equals resampling the logits ``z``: ``log p = z -
logsumexp(z)`` differs from ``z`` by one value per voxel, which interpolation turns into one value per
output voxel, and the softmax ignores it (exact for linear and nearest interpolation; order 1 is nnU-Net's).
Native 2D images get a z spacing of 999, as nnU-Net's 2D image reader gives them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes, map_coordinates, zoom

from medkd.data.grid import spacing_zyx
from medkd.data.io import Geometry

__all__ = ["ANISO_THRESHOLD", "nnunet_normalize", "nnunet_to_preprocessed_grid", "preprocess_nnunet",
           "resample_data_or_seg", "restore_nnunet_probabilities"]

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
NATIVE_2D_Z_SPACING = 999.0


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False)`` (float64)."""
    image = np.asarray(image, dtype=np.float64)
    factors = [n / o for n, o in zip(shape, image.shape)]
    out = zoom(image, factors, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, image.min(), image.max(), out=out) if order > 0 else out


def _resize_labels(label: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """batchgenerators' ``resize_segmentation``: each label's indicator resized; per voxel the label with the
    highest score wins, an exact tie going to the nearest-neighbour label when it is among the tied (else
    the smallest tied label)."""
    nearest = _resize(label.astype(np.float64), shape, 0).astype(label.dtype)
    if order == 0:
        return nearest
    values = np.unique(label)
    scores = np.stack([_resize((label == value).astype(np.float64), shape, order) for value in values])
    best = scores.max(0)
    winner = values[scores.argmax(0)]
    nearest_score = np.take_along_axis(scores, np.searchsorted(values, nearest)[None], 0)[0]
    return np.where((nearest_score == best) & (best > 0), nearest, winner).astype(label.dtype)


def separate_z(current: Sequence[float], new: Sequence[float], force: bool | None) -> int | None:
    """The low-resolution axis to resample separately (nnU-Net's ``determine_do_sep_z_and_axis``), or None."""
    def lowres_axes(spacing: Sequence[float]) -> np.ndarray:
        return np.where(max(spacing) / np.asarray(spacing, dtype=float) == 1)[0]

    if force is not None:
        axes = lowres_axes(current) if force else None
    elif max(current) / min(current) > ANISO_THRESHOLD:
        axes = lowres_axes(current)
    elif max(new) / min(new) > ANISO_THRESHOLD:
        axes = lowres_axes(new)
    else:
        axes = None
    return None if axes is None or len(axes) != 1 else int(axes[0])


def resample_data_or_seg(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                         new_spacing: Sequence[float], *, is_seg: bool = False, order: int = 3, order_z: int = 0,
                         force_separate_z: bool | None = False) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` of ``data`` ``(C, a, b, c)`` to ``(C, *new_shape)``."""
    new_shape = [int(s) for s in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    resize = _resize_labels if is_seg else _resize
    axis = separate_z(current_spacing, new_spacing, force_separate_z)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], new_shape, order)
            continue
        plane = [s for a, s in enumerate(new_shape) if a != axis]
        slices = [resize(np.take(data[c], i, axis=axis), plane, order) for i in range(data.shape[axis + 1])]
        stacked = np.stack(slices, axis=axis)
        if stacked.shape[axis] == new_shape[axis]:
            out[c] = stacked
            continue
        scale = [o / n for o, n in zip(stacked.shape, new_shape)]
        grid = np.mgrid[tuple(slice(0, n) for n in new_shape)].astype(np.float64)
        coords = np.stack([s * (g + 0.5) - 0.5 for s, g in zip(scale, grid)])
        if not is_seg or order_z == 0:
            out[c] = map_coordinates(stacked, coords, order=order_z, mode="nearest")
        else:
            for value in np.unique(stacked):
                hit = np.round(map_coordinates((stacked == value).astype(float), coords, order=order_z, mode="nearest"))
                out[c][hit > 0.5] = value
    return out


def nonzero_mask_bbox(image: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """nnU-Net's non-zero mask (any channel non-zero, holes filled) of ``image`` (C, *spatial) and its bbox."""
    mask = binary_fill_holes(np.any(image != 0, axis=0))
    if not mask.any():
        return mask, [[0, s] for s in mask.shape]
    bbox = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bbox.append([int(hit[0]), int(hit[-1]) + 1])
    return mask, bbox


def nnunet_normalize(image: np.ndarray, mask: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """Each channel of ``image`` (C, *spatial) by its scheme in ``plan`` (module docstring), float32."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(plan["normalization"]):
        x = image[c].astype(np.float32)
        if scheme == "ZScoreNormalization":
            if plan["use_mask_for_norm"][c]:
                x[mask] = (x[mask] - x[mask].mean()) / max(float(x[mask].std()), 1e-8)
            else:
                x = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif scheme == "CTNormalization":
            stats = plan["intensity"][c]
            x = (np.clip(x, stats["percentile_00_5"], stats["percentile_99_5"]) - np.float32(stats["mean"])) \
                / np.float32(max(stats["std"], 1e-8))
        elif scheme == "RescaleTo01Normalization":
            x = x - x.min()
            x = x / max(float(x.max()), 1e-8)
        elif scheme == "RGBTo01Normalization":
            x = x / 255.0
        elif scheme != "NoNormalization":
            raise ValueError(f"unknown nnU-Net normalization scheme {scheme!r}")
        out[c] = x
    return out


def _target_spacing(plan: dict[str, Any], spacing: Sequence[float]) -> list[float]:
    target = list(plan["spacing"])
    return [spacing[0], *target] if len(target) < len(spacing) else target


def preprocess_nnunet(image: np.ndarray, label: np.ndarray | None, geometry: Geometry,
                      plan: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """nnU-Net's preprocessing of one case (module docstring).

    Args:
        image: (C, *spatial), spatial (z, y, x) or (y, x) for a native 2D image, as read.
        label: (*spatial) integer labels or None.
    Returns:
        image (C, a, b, c) float32 in nnU-Net's (transposed) axis order, label (1, a, b, c) int16 or
        None, and the properties :func:`restore_nnunet_probabilities` needs.
    """
    original_shape = list(image.shape[1:])
    native_2d = image.ndim == 3
    if native_2d:
        image, label = image[:, None], (None if label is None else label[None])
    spacing = spacing_zyx(geometry, image.ndim - 1)
    if native_2d:
        spacing[0] = NATIVE_2D_Z_SPACING
    forward = plan["transpose_forward"]
    image = image.transpose([0, *[a + 1 for a in forward]])
    label = None if label is None else label.transpose(forward)
    spacing_t = [spacing[a] for a in forward]
    mask, bbox = nonzero_mask_bbox(image)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    image, mask = image[(slice(None), *crop)], mask[crop]
    target = _target_spacing(plan, spacing_t)
    new_shape = [int(round(sp / t * s)) for sp, t, s in zip(spacing_t, target, image.shape[1:])]
    image = nnunet_normalize(image, mask, plan)
    image = resample_data_or_seg(image, new_shape, spacing_t, target, **plan["resampling"]["data"]).astype(np.float32)
    if label is not None:
        label = resample_data_or_seg(label[crop][None].astype(np.int16), new_shape, spacing_t, target,
                                     **plan["resampling"]["seg"]).astype(np.int16)
    props = {"nnunet": True, "original_shape": original_shape, "native_2d": native_2d,
             "geometry": geometry.to_dict(), "spacing_zyx": spacing, "spacing_transposed": spacing_t,
             "target_spacing": target, "crop_bbox": bbox, "cropped_shape": [hi - lo for lo, hi in bbox],
             "shape": list(image.shape[1:]), "transpose_forward": list(forward),
             "transpose_backward": list(plan["transpose_backward"]), "resampling": plan["resampling"]["probabilities"]}
    return image, label, props


def restore_nnunet_probabilities(probabilities: np.ndarray, props: dict[str, Any],
                                 original_shape: Sequence[int]) -> np.ndarray:
    """(K, *preprocessed shape) -> (K, *original_shape): resample, un-crop (background 1), transpose back."""
    log_p = np.log(np.maximum(probabilities.astype(np.float32), np.finfo(np.float32).tiny))
    restored = resample_data_or_seg(log_p, props["cropped_shape"], props["target_spacing"],
                                    props["spacing_transposed"], **props["resampling"])
    restored = np.exp(restored - restored.max(0, keepdims=True))
    restored /= restored.sum(0, keepdims=True)
    full = [1, *original_shape] if props["native_2d"] else list(original_shape)
    full_t = [full[a] for a in props["transpose_forward"]]
    out = np.zeros((probabilities.shape[0], *full_t), dtype=np.float32)
    out[0] = 1.0
    out[(slice(None), *(slice(lo, hi) for lo, hi in props["crop_bbox"]))] = restored
    out = out.transpose([0, *[a + 1 for a in props["transpose_backward"]]])
    return np.ascontiguousarray(out[:, 0] if props["native_2d"] else out)


def nnunet_to_preprocessed_grid(probabilities: np.ndarray, props: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`restore_nnunet_probabilities`: (K, *original) -> (K, *preprocessed shape)."""
    array = probabilities[:, None] if props["native_2d"] else probabilities
    array = array.transpose([0, *[a + 1 for a in props["transpose_forward"]]])
    array = array[(slice(None), *(slice(lo, hi) for lo, hi in props["crop_bbox"]))]
    return resample_data_or_seg(np.ascontiguousarray(array, dtype=np.float32), props["shape"],
                                props["spacing_transposed"], props["target_spacing"], **props["resampling"])
