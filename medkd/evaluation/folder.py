"""Folder evaluation: pair predictions with references by case id, check and score each pair."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medkd.data import io as image_io
from medkd.evaluation.metrics import BACKGROUND, case_metrics
from medkd.evaluation.results import EvaluationResult

__all__ = ["evaluate_folder"]


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
    Distances use the reference's spacing: mm, or pixels without a physical spacing (PNG): ``distance_unit``.

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
    unit = "mm" if all(image_io.has_physical_spacing(image_io.file_ending(ref)) for _, _, ref in pairs) else "px"
    return EvaluationResult([row for rows in per_pair for row in rows], foreground_names, distance_unit=unit)
