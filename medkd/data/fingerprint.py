"""A dataset's fingerprint (nnU-Net's ``dataset_fingerprint.json``, computed and cached by medkd).

Per training case: spacing (numpy order z, y, x; native 2D images get z = 1), the shape after
cropping to the non-zero region, up to :data:`SAMPLES_PER_CASE` foreground intensities per channel
and the voxel count of every label value. Over the dataset: per-channel foreground statistics
(mean, std, median, 0.5/99.5 percentiles), class voxel frequencies, median spacing and shape, and the
anisotropy ``max(median spacing) / min(median spacing)``.

The fingerprint is cached as JSON in the dataset's medkd cache (``data.cache_dir``, ``$MEDKD_CACHE``
or ``.cache/medkd``), keyed like the preprocessing cache by the source files' paths, sizes and
modification times, and recomputed when any of them changes.

Bad input is refused with one :class:`~medkd.data.dataset.DatasetError` naming the case: no training
case, a spacing that is zero, negative or not finite, an image whose in-plane axes are smaller than
the smallest patch (:data:`MIN_EDGE` voxels), a channel constant over every training image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medkd.data.dataset import Case, DatasetError, DatasetInfo, read_case
from medkd.data.grid import nonzero_bbox, spacing_zyx
from medkd.data.io import has_physical_spacing
from medkd.storage import atomic_write_text

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000
MIN_EDGE = 8  # the smallest patch edge medkd trains on (data.patch_size entries are >= 8)


def _case_sources(case: Case) -> list[list[Any]]:
    files = [*case.image_files, *([case.label_file] if case.label_file else [])]
    return [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in files]


def fingerprint_key(dataset: DatasetInfo) -> str:
    """12 hex digits of SHA-1 over the version, dataset.json and every training file's path, size and mtime."""
    digest = hashlib.sha1(f"v{FINGERPRINT_VERSION}".encode())
    description = dataset.root / "dataset.json"
    if description.is_file():
        digest.update(description.read_bytes())
    for case in dataset.training:
        digest.update(json.dumps([case.case_id, _case_sources(case)]).encode())
    return digest.hexdigest()[:12]


def _checked_spacing(case: Case, spacing: list[float]) -> list[float]:
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(f"case {case.case_id} ({case.image_files[0]}): spacing {spacing} (z, y, x) must be "
                           "positive and finite; fix the image header")
    return spacing


def case_fingerprint(case: Case, dataset: DatasetInfo, seed: int = 0) -> dict[str, Any]:
    """One case's entry: spacing, native dims, cropped shape, foreground samples and label counts."""
    image, label, geometry = read_case(case, dataset)
    native_dims = image.ndim - 1
    spacing = _checked_spacing(case, spacing_zyx(geometry, native_dims))
    bbox = nonzero_bbox(image)
    shape = [hi - lo for lo, hi in bbox]
    shape = [1] * (3 - len(shape)) + shape
    inplane = shape[-2:]
    if min(inplane) < MIN_EDGE:
        raise DatasetError(f"case {case.case_id} ({case.image_files[0]}): its non-zero region is {shape[-2]}x"
                           f"{shape[-1]} voxels in-plane, smaller than the smallest patch ({MIN_EDGE}x{MIN_EDGE})")
    rng = np.random.default_rng(seed)
    foreground = label > 0 if label is not None else np.ones(image.shape[1:], bool)
    samples, lows, highs = [], [], []
    for c in range(image.shape[0]):
        values = image[c][foreground]
        take = rng.choice(values.size, size=min(values.size, SAMPLES_PER_CASE), replace=False) if values.size else []
        samples.append(values[take].astype(np.float64).tolist())
        lows.append(float(image[c].min()))
        highs.append(float(image[c].max()))
    counts = np.bincount(label.ravel().astype(np.int64)) if label is not None else np.zeros(1, np.int64)
    return {"case_id": case.case_id, "spacing": spacing, "native_dims": native_dims, "shape_after_crop": shape,
            "foreground_samples": samples, "channel_min": lows, "channel_max": highs,
            "label_counts": {str(v): int(n) for v, n in enumerate(counts) if n}}


def _channel_statistics(cases: list[dict[str, Any]], channel: int) -> dict[str, float]:
    pooled = np.concatenate([np.asarray(c["foreground_samples"][channel], np.float64) for c in cases])
    if pooled.size == 0:
        return {k: 0.0 for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")}
    low, high = np.percentile(pooled, [0.5, 99.5])
    return {"mean": float(pooled.mean()), "std": float(pooled.std()), "median": float(np.median(pooled)),
            "min": float(pooled.min()), "max": float(pooled.max()), "percentile_00_5": float(low),
            "percentile_99_5": float(high)}


def _check_channels(cases: list[dict[str, Any]], dataset: DatasetInfo) -> None:
    for c in range(dataset.num_channels):
        low = min(case["channel_min"][c] for case in cases)
        high = max(case["channel_max"][c] for case in cases)
        if low == high:
            name = dataset.channel_names.get(c, str(c))
            raise DatasetError(f"{dataset.root}: channel {c} ({name}) is constant ({low:g}) in every training image "
                               f"(e.g. case {cases[0]['case_id']}): nothing to learn from it")


def summarize(cases: list[dict[str, Any]], dataset: DatasetInfo) -> dict[str, Any]:
    """Dataset-level fingerprint from the per-case entries (see the module doc)."""
    spacings = np.array([c["spacing"] for c in cases], np.float64)
    shapes = np.array([c["shape_after_crop"] for c in cases], np.float64)
    median_spacing = np.median(spacings, axis=0)
    dims = 2 if all(c["native_dims"] == 2 for c in cases) else 3
    totals: dict[int, int] = {}
    for case in cases:
        for value, n in case["label_counts"].items():
            totals[int(value)] = totals.get(int(value), 0) + n
    voxels = max(1, sum(totals.values()))
    names = dataset.class_names
    spacing_axes = median_spacing[-dims:]
    return {
        "dataset": dataset.name, "num_cases": len(cases), "num_channels": dataset.num_channels,
        "channel_names": [dataset.channel_names.get(c, str(c)) for c in range(dataset.num_channels)],
        "spatial_dims": dims, "physical_spacing": has_physical_spacing(dataset.file_ending),
        "spacings": spacings.tolist(), "shapes_after_crop": shapes.astype(int).tolist(),
        "median_spacing": median_spacing.tolist(), "median_shape": np.median(shapes, axis=0).tolist(),
        "anisotropy": float(spacing_axes.max() / spacing_axes.min()),
        "foreground_intensities": [_channel_statistics(cases, c) for c in range(dataset.num_channels)],
        "class_frequencies": {names[v] if v < len(names) else str(v): n / voxels for v, n in sorted(totals.items())},
        "total_voxels": float(np.prod(shapes, axis=1).sum()),
    }


def compute_fingerprint(dataset: DatasetInfo, progress: Callable[[Iterable], Iterable] | None = None,
                        ) -> dict[str, Any]:
    """The fingerprint of ``dataset``'s training cases (uncached); raises DatasetError on bad input."""
    if not dataset.training:
        raise DatasetError(f"{dataset.root}: the dataset has no training cases (imagesTr/labelsTr or MSD "
                           "'training'); nothing to plan from")
    cases = [case_fingerprint(case, dataset, seed=i) for i, case in enumerate((progress or iter)(dataset.training))]
    _check_channels(cases, dataset)
    return summarize(cases, dataset)


def load_or_compute_fingerprint(dataset: DatasetInfo, cache_root: Path,
                                progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """The cached fingerprint of ``dataset`` under ``cache_root`` when its sources are unchanged, else computed
    (and then cached, atomically). A cached file that cannot be read is recomputed with a warning."""
    if not dataset.training:
        compute_fingerprint(dataset)  # raises the empty-dataset error
    path = Path(cache_root) / f"{dataset.name}_fingerprint_{fingerprint_key(dataset)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("fingerprint cache %s is unreadable (%s); recomputing it", path, err)
    fingerprint = compute_fingerprint(dataset, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(fingerprint))
    return fingerprint
