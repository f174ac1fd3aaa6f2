"""Segmentation metrics per case and per folder, computed with MONAI.

Dice, the 95th-percentile Hausdorff distance (HD95) and the average symmetric
surface distance (ASD) come from :mod:`monai.metrics`; this module only builds
one-hot tensors, applies the empty-mask conventions below, pairs files and
aggregates.

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
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from rich.table import Table

from medkd.data import io as image_io
from medkd.evaluation.report import comparison_table, write_csv, write_json

__all__ = [
    "METRIC_NAMES",
    "MEAN_FOREGROUND",
    "EvaluationResult",
    "case_metrics",
    "evaluate_folder",
]

#: Metrics reported per case and class, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "asd")
#: Key of the summary entry that averages the per-class means.
MEAN_FOREGROUND = "mean_foreground"
#: Label value that is always allowed and never scored.
BACKGROUND = 0


# --------------------------------------------------------------------------- #
# One case
# --------------------------------------------------------------------------- #
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
    with warnings.catch_warnings():
        # MONAI warns about empty masks (callers never pass any) and, internally, about
        # its own deprecated get_mask_edges argument; neither concerns the caller.
        warnings.filterwarnings("ignore", message=".*is all 0.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_oh, ref_oh, include_background=True, percentile=95, spacing=spacing
        )
        asd = compute_average_surface_distance(
            pred_oh, ref_oh, include_background=True, symmetric=True, spacing=spacing
        )
    return hd95[0].cpu().numpy().astype(float), asd[0].cpu().numpy().astype(float)


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
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.ndim == 0:
        raise ValueError("label maps must have at least one dimension")
    values = [int(v) for v in class_values]
    if not values:
        raise ValueError("class_values is empty: nothing to evaluate")
    if len(set(values)) != len(values):
        raise ValueError(f"class_values has duplicates: {values}")
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


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """NaN-aware mean and population standard deviation (``ddof=0``); NaN when nothing is left."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std())


def _format_mean_std(mean: float, std: float, spec: str) -> str:
    """``"mean ± std"`` with ``spec``, ``"-"`` for a missing mean."""
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


@dataclass
class EvaluationResult:
    """Per-case, per-class metrics of one evaluation run.

    Attributes:
        per_case: one row per case and foreground class with keys ``"case"``,
            ``"class"`` (the class name), ``"label"`` (its value), ``"dice"``,
            ``"hd95"``, ``"asd"``, ``"ref_voxels"`` and ``"pred_voxels"``.
            Distances are NaN where exactly one of the masks is empty.
        class_names: names of the scored classes in report order (defaults to
            their order of appearance in ``per_case``).
    """

    per_case: list[dict]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = list(dict.fromkeys(row["class"] for row in self.per_case))
        if MEAN_FOREGROUND in self.class_names:
            raise ValueError(f"{MEAN_FOREGROUND!r} is reserved and cannot be a class name")

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Mean and standard deviation of each metric per class, plus their mean over classes.

        Returns:
            ``{class_name: {"dice_mean", "dice_std", "hd95_mean", "hd95_std",
            "asd_mean", "asd_std", "n_cases", "n_missing"}, ...,
            "mean_foreground": {"dice_mean", "hd95_mean", "asd_mean", "n_missing"}}``.
            Means and standard deviations (population, ``ddof=0``) skip NaN values;
            ``n_missing`` counts the cases whose distances are NaN (one mask empty).
            ``mean_foreground`` averages the per-class means (NaN means skipped).
        """
        out: dict[str, dict[str, float | int]] = {}
        for name in self.class_names:
            rows = [row for row in self.per_case if row["class"] == name]
            entry: dict[str, float | int] = {}
            for metric in METRIC_NAMES:
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([float(r[metric]) for r in rows])
            entry["n_cases"] = len(rows)
            entry["n_missing"] = sum(1 for r in rows if math.isnan(float(r["hd95"])))
            out[name] = entry
        overall: dict[str, float | int] = {
            f"{metric}_mean": _mean_std([float(out[name][f"{metric}_mean"]) for name in self.class_names])[0]
            for metric in METRIC_NAMES
        }
        overall["n_missing"] = sum(int(out[name]["n_missing"]) for name in self.class_names)
        out[MEAN_FOREGROUND] = overall
        return out

    def summary_rows(self) -> list[dict[str, Any]]:
        """The summary as flat rows (one per class, then ``mean_foreground``) for CSV and tables."""
        return [{"class": name, **values} for name, values in self.summary().items()]

    def save(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``per_case.csv``, ``summary.csv`` and ``summary.json`` into ``out_dir``.

        Each file is written atomically. NaN is written as ``nan`` in the CSV files
        and as ``null`` in the JSON file.

        Returns:
            ``{"per_case_csv": path, "summary_csv": path, "summary_json": path}``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_case_fields = ["case", "class", "label", *METRIC_NAMES, "ref_voxels", "pred_voxels"]
        summary_fields = ["class"] + [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")]
        summary_fields += ["n_cases", "n_missing"]
        return {
            "per_case_csv": write_csv(self.per_case, out / "per_case.csv", fieldnames=per_case_fields),
            "summary_csv": write_csv(self.summary_rows(), out / "summary.csv", fieldnames=summary_fields),
            "summary_json": write_json(self.summary(), out / "summary.json"),
        }

    def table(self, title: str | None = None) -> Table:
        """A rich table with one row per class (and the foreground mean): Dice, HD95, ASD as mean ± std."""
        rows = []
        for row in self.summary_rows():
            rows.append(
                {
                    "class": row["class"],
                    "dice": _format_mean_std(row["dice_mean"], row.get("dice_std", math.nan), ".3f"),
                    "hd95": _format_mean_std(row["hd95_mean"], row.get("hd95_std", math.nan), ".2f"),
                    "asd": _format_mean_std(row["asd_mean"], row.get("asd_std", math.nan), ".2f"),
                    "n_missing": row["n_missing"],
                }
            )
        columns = [
            ("class", "Class", ""),
            ("dice", "Dice", ""),
            ("hd95", "HD95 (mm)", ""),
            ("asd", "ASD (mm)", ""),
            ("n_missing", "Missing dist.", ",d"),
        ]
        return comparison_table(rows, columns, title or "Segmentation metrics")


# --------------------------------------------------------------------------- #
# Folder evaluation
# --------------------------------------------------------------------------- #
def _split_ending(name: str, file_ending: str | None) -> tuple[str, str] | None:
    """``(case_id, ending)`` for a file name with a supported (or the requested) ending, else ``None``."""
    endings = (file_ending,) if file_ending else image_io.SUPPORTED_ENDINGS
    for ending in sorted(endings, key=len, reverse=True):
        if name.lower().endswith(ending.lower()) and len(name) > len(ending):
            return name[: -len(ending)], ending
    return None


def _list_cases(folder: Path, file_ending: str | None) -> dict[str, Path]:
    """Map case id -> image file for the image files directly inside ``folder``."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        split = _split_ending(path.name, file_ending)
        if path.name.startswith(".") or not path.is_file() or split is None:
            continue
        case_id = split[0]
        if case_id in cases:
            raise ValueError(f"case {case_id!r} has two files in {folder}: {cases[case_id].name} and {path.name}")
        cases[case_id] = path
    return cases


def _is_uncertainty_map(case_id: str, preds: Mapping[str, Path]) -> bool:
    """True for ``CASE_uncertainty`` beside a prediction of ``CASE`` (written by ``medkd predict --uncertainty``)."""
    suffix = image_io.UNCERTAINTY_SUFFIX
    return case_id.endswith(suffix) and case_id[: -len(suffix)] in preds


def _pair_cases(
    pred_dir: Path, ref_dir: Path, case_ids: Sequence[str] | None, file_ending: str | None
) -> list[tuple[str, Path, Path]]:
    """``(case_id, pred_path, ref_path)`` for each case, checking that both files exist."""
    preds, refs = _list_cases(pred_dir, file_ending), _list_cases(ref_dir, file_ending)
    if case_ids is None:
        orphans = sorted(c for c in set(preds) - set(refs) if not _is_uncertainty_map(c, preds))
        if orphans:
            raise FileNotFoundError(
                f"no reference in {ref_dir} for prediction(s) {', '.join(preds[c].name for c in orphans)}"
            )
        case_ids = sorted(refs)
        if not case_ids:
            raise FileNotFoundError(f"no reference images found in {ref_dir}")
    pairs = []
    for case_id in case_ids:
        if case_id not in refs:
            raise FileNotFoundError(f"reference for case {case_id!r} not found in {ref_dir}")
        if case_id not in preds:
            raise FileNotFoundError(
                f"prediction for case {case_id!r} (reference {refs[case_id].name}) not found in {pred_dir}"
            )
        pairs.append((case_id, preds[case_id], refs[case_id]))
    return pairs


def _as_labels(array: np.ndarray, path: Path, allowed: set[int]) -> np.ndarray:
    """``array`` as int64 labels; ValueError naming ``path`` for non-integer or unknown values."""
    values = np.unique(array)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{path}: label map has non-integer values {values[np.mod(values, 1) != 0][:10].tolist()}")
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        raise ValueError(f"{path}: label values {unknown} are not in class_names (known: {sorted(allowed)})")
    return array.astype(np.int64, copy=False)


def _evaluate_case(
    case_id: str, pred_path: Path, ref_path: Path, class_names: Mapping[int, str]
) -> list[dict[str, Any]]:
    """Read, check and score one case; one row per foreground class."""
    pred, pred_geom = image_io.read_image(pred_path)
    ref, ref_geom = image_io.read_image(ref_path)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred_path} has {pred.shape}, reference {ref_path} has {ref.shape}")
    if not ref_geom.matches(pred_geom):
        raise ValueError(
            f"geometry mismatch between prediction {pred_path} ({pred_geom}) and reference {ref_path} ({ref_geom})"
        )
    spacing_zyx = tuple(reversed(tuple(ref_geom.spacing)))
    if len(spacing_zyx) != ref.ndim:
        raise ValueError(f"{ref_path}: {len(spacing_zyx)}-d spacing for an array of shape {ref.shape}")
    allowed = set(class_names) | {BACKGROUND}
    pred = _as_labels(pred, pred_path, allowed)
    ref = _as_labels(ref, ref_path, allowed)
    foreground = [value for value in class_names if value != BACKGROUND]
    scores = case_metrics(pred, ref, foreground, spacing_zyx)
    return [{"case": case_id, "class": class_names[value], "label": value, **scores[value]} for value in foreground]


def evaluate_folder(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    class_names: Mapping[int, str],
    *,
    case_ids: Sequence[str] | None = None,
    file_ending: str | None = None,
    num_workers: int = 1,
) -> EvaluationResult:
    """Score every prediction in ``pred_dir`` against the reference of the same case in ``ref_dir``.

    Files are paired by case id, the file name without its ending (one of
    :data:`medkd.data.io.SUPPORTED_ENDINGS`, or only ``file_ending`` when given).
    Other files (and hidden ones) are ignored, and so are the uncertainty maps
    (``CASE_uncertainty<ending>`` beside ``CASE<ending>``) of an ensemble's prediction folder.
    Distances use the reference's spacing.

    Args:
        pred_dir: folder with predicted label maps.
        ref_dir: folder with reference label maps.
        class_names: ``{label value: name}`` of the foreground classes to score; an
            entry for background ``0`` is allowed and is not scored.
        case_ids: cases to evaluate; default: every reference case.
        file_ending: only consider files with this ending, e.g. ``".nii.gz"``.
        num_workers: number of threads used to score cases in parallel.

    Returns:
        An :class:`EvaluationResult` with rows ordered by case, then class value.

    Raises:
        FileNotFoundError: a case has no prediction or no reference (naming it), or
            ``ref_dir`` holds no images.
        NotADirectoryError: a folder does not exist.
        ValueError: shapes or geometries of a pair differ (naming both files), a file
            has label values missing from ``class_names`` (naming file and values), or
            ``class_names`` has no foreground class.
    """
    names = {int(value): str(name) for value, name in sorted(class_names.items())}
    if not any(value != BACKGROUND for value in names):
        raise ValueError(f"class_names {dict(class_names)} has no foreground class (value != 0)")
    if len(set(names.values())) != len(names):
        raise ValueError(f"class_names {names} has duplicate names")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if file_ending is not None and not file_ending.startswith("."):
        raise ValueError(f"file_ending must start with '.', got {file_ending!r}")
    pairs = _pair_cases(Path(pred_dir), Path(ref_dir), case_ids, file_ending)

    def run(pair: tuple[str, Path, Path]) -> list[dict[str, Any]]:
        return _evaluate_case(*pair, names)

    if num_workers == 1 or len(pairs) == 1:
        per_pair = [run(pair) for pair in pairs]
    else:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            per_pair = list(pool.map(run, pairs))
    foreground_names = [name for value, name in names.items() if value != BACKGROUND]
    return EvaluationResult([row for rows in per_pair for row in rows], class_names=foreground_names)
