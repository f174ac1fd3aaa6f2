"""Tests for medkd.evaluation.metrics: hand-computed values, conventions, folder evaluation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from medkd.data.io import Geometry, write_image
from medkd.evaluation import EvaluationResult, case_metrics, evaluate_folder

SPACING_ZYX = (3.0, 0.5, 0.7)


# --------------------------------------------------------------------------- #
# case_metrics
# --------------------------------------------------------------------------- #
def test_dice_of_overlapping_squares() -> None:
    ref = np.zeros((10, 10), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[1:5, 1:5] = 1  # 16 voxels
    pred[2:6, 2:6] = 1  # 16 voxels, overlap 3x3 = 9
    out = case_metrics(pred, ref, [1])
    assert out[1]["dice"] == pytest.approx(2 * 9 / (16 + 16))
    assert out[1]["ref_voxels"] == 16
    assert out[1]["pred_voxels"] == 16


def test_dice_per_class_with_two_classes() -> None:
    ref = np.zeros((8, 8), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[0:2, 0:4] = 1  # 8 voxels of class 1
    pred[0:2, 0:2] = 1  # 4 voxels, all inside
    ref[5:8, 5:8] = 2  # 9 voxels of class 2
    pred[5:8, 5:8] = 2
    pred[4, 0] = 2  # one false positive
    out = case_metrics(pred, ref, [1, 2])
    assert out[1]["dice"] == pytest.approx(2 * 4 / (8 + 4))
    assert out[2]["dice"] == pytest.approx(2 * 9 / (9 + 10))
    assert set(out) == {1, 2}
    assert set(out[1]) == {"dice", "hd95", "asd", "ref_voxels", "pred_voxels"}


def test_identical_masks_have_zero_distance() -> None:
    ref = np.zeros((5, 9, 9), dtype=np.int64)
    ref[1:4, 2:7, 3:6] = 1
    out = case_metrics(ref.copy(), ref, [1], SPACING_ZYX)
    assert out[1] == {"dice": pytest.approx(1.0), "hd95": 0.0, "asd": 0.0, "ref_voxels": 45, "pred_voxels": 45}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shift_by_two_voxels_scales_with_spacing_of_that_axis(axis: int) -> None:
    # One-voxel-thick planes are all surface: every voxel's nearest counterpart lies exactly
    # two voxels away along `axis`, so HD95 = ASD = 2 * spacing[axis].
    ref = np.zeros((6, 8, 8), dtype=np.int64)
    pred = np.zeros_like(ref)
    index_ref = [slice(None)] * 3
    index_pred = [slice(None)] * 3
    index_ref[axis], index_pred[axis] = 2, 4
    ref[tuple(index_ref)] = 1
    pred[tuple(index_pred)] = 1
    out = case_metrics(pred, ref, [1], SPACING_ZYX)
    assert out[1]["dice"] == 0.0
    assert out[1]["hd95"] == pytest.approx(2 * SPACING_ZYX[axis])
    assert out[1]["asd"] == pytest.approx(2 * SPACING_ZYX[axis])


def test_hd95_ignores_single_outlier_but_asd_averages_it() -> None:
    # Reference: 30 voxels in a row. Prediction: the same plus one voxel 10 voxels beyond the end.
    # Symmetric distances: 30 zeros (ref -> pred), 30 zeros and one 10 * 2 mm (pred -> ref).
    # The 95th percentile of each direction is 0; the mean over all 61 distances is 20 / 61.
    ref = np.zeros((1, 40), dtype=np.int64)
    ref[0, :30] = 1
    pred = ref.copy()
    pred[0, 39] = 1
    out = case_metrics(pred, ref, [1], (1.0, 2.0))
    assert out[1]["dice"] == pytest.approx(2 * 30 / 61)
    assert out[1]["hd95"] == pytest.approx(0.0)
    assert out[1]["asd"] == pytest.approx(20.0 / 61)


def test_unit_spacing_when_none() -> None:
    ref = np.zeros((6, 6), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[:, 1] = 1
    pred[:, 4] = 1
    out = case_metrics(pred, ref, [1])
    assert out[1]["hd95"] == pytest.approx(3.0)
    assert out[1]["asd"] == pytest.approx(3.0)


def test_both_empty_is_perfect() -> None:
    ref = np.zeros((4, 4), dtype=np.int64)
    out = case_metrics(ref.copy(), ref, [1])
    assert out[1] == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "ref_voxels": 0, "pred_voxels": 0}


@pytest.mark.parametrize("empty", ["pred", "ref"])
def test_one_empty_gives_zero_dice_and_missing_distances(empty: str) -> None:
    full = np.zeros((4, 4), dtype=np.int64)
    full[1:3, 1:3] = 1
    nothing = np.zeros_like(full)
    pred, ref = (nothing, full) if empty == "pred" else (full, nothing)
    out = case_metrics(pred, ref, [1])
    assert out[1]["dice"] == 0.0
    assert math.isnan(out[1]["hd95"])
    assert math.isnan(out[1]["asd"])


def test_distances_only_for_classes_present_in_both() -> None:
    ref = np.zeros((6, 6), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[0, :] = 1
    pred[2, :] = 1
    ref[5, 5] = 2  # class 2 missing in the prediction
    out = case_metrics(pred, ref, [1, 2, 3], (0.5, 1.0))
    assert out[1]["hd95"] == pytest.approx(1.0)
    assert math.isnan(out[2]["hd95"]) and out[2]["dice"] == 0.0
    assert out[3] == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "ref_voxels": 0, "pred_voxels": 0}


def test_case_metrics_rejects_bad_input() -> None:
    a = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(a, np.zeros((4, 5), dtype=np.int64), [1])
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, [1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, [1], (1.0, 0.0))
    with pytest.raises(ValueError, match="class_values"):
        case_metrics(a, a, [])


# --------------------------------------------------------------------------- #
# EvaluationResult
# --------------------------------------------------------------------------- #
def _row(case: str, cls: str, dice: float, hd95: float, asd: float) -> dict:
    return {"case": case, "class": cls, "label": 1, "dice": dice, "hd95": hd95, "asd": asd}


def _result() -> EvaluationResult:
    return EvaluationResult(
        [
            _row("a", "lv", 0.8, 2.0, 1.0),
            _row("a", "rv", 0.5, 6.0, 3.0),
            _row("b", "lv", 0.6, 4.0, 2.0),
            _row("b", "rv", 0.0, math.nan, math.nan),
        ]
    )


def test_summary_mean_std_and_missing() -> None:
    summary = _result().summary()
    assert list(summary) == ["lv", "rv", "mean_foreground"]
    lv, rv, fg = summary["lv"], summary["rv"], summary["mean_foreground"]
    assert lv["dice_mean"] == pytest.approx(0.7)
    assert lv["dice_std"] == pytest.approx(0.1)  # population std of (0.8, 0.6)
    assert lv["hd95_mean"] == pytest.approx(3.0)
    assert lv["hd95_std"] == pytest.approx(1.0)
    assert lv["asd_mean"] == pytest.approx(1.5)
    assert (lv["n_cases"], lv["n_missing"]) == (2, 0)
    assert rv["dice_mean"] == pytest.approx(0.25)
    assert rv["hd95_mean"] == pytest.approx(6.0)  # NaN skipped ...
    assert rv["hd95_std"] == pytest.approx(0.0)
    assert (rv["n_cases"], rv["n_missing"]) == (2, 1)  # ... and counted
    assert fg["dice_mean"] == pytest.approx((0.7 + 0.25) / 2)
    assert fg["hd95_mean"] == pytest.approx((3.0 + 6.0) / 2)
    assert fg["asd_mean"] == pytest.approx((1.5 + 3.0) / 2)
    assert fg["n_missing"] == 1


def test_summary_all_distances_missing_is_nan() -> None:
    result = EvaluationResult([_row("a", "lv", 0.0, math.nan, math.nan)])
    summary = result.summary()
    assert math.isnan(summary["lv"]["hd95_mean"]) and summary["lv"]["n_missing"] == 1
    assert math.isnan(summary["mean_foreground"]["asd_mean"])


def test_save_writes_parsable_files(tmp_path: Path) -> None:
    paths = _result().save(tmp_path / "out")
    assert set(paths) == {"per_case_csv", "summary_csv", "summary_json"}
    assert all(p.is_file() for p in paths.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["per_case.csv", "summary.csv", "summary.json"]

    with paths["per_case_csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert rows[0]["case"] == "a" and float(rows[0]["dice"]) == pytest.approx(0.8)
    assert math.isnan(float(rows[3]["hd95"]))

    with paths["summary_csv"].open(newline="") as handle:
        summary_rows = list(csv.DictReader(handle))
    assert [r["class"] for r in summary_rows] == ["lv", "rv", "mean_foreground"]
    assert float(summary_rows[1]["dice_mean"]) == pytest.approx(0.25)
    assert int(summary_rows[1]["n_missing"]) == 1

    data = json.loads(paths["summary_json"].read_text())
    assert data["lv"]["dice_std"] == pytest.approx(0.1)
    assert data["mean_foreground"]["n_missing"] == 1


def test_save_json_uses_null_for_nan(tmp_path: Path) -> None:
    paths = EvaluationResult([_row("a", "lv", 0.0, math.nan, math.nan)]).save(tmp_path)
    text = paths["summary_json"].read_text()
    assert "NaN" not in text
    assert json.loads(text)["lv"]["hd95_mean"] is None


def test_table_has_one_row_per_class_and_the_mean() -> None:
    table = _result().table("ACDC")
    assert table.title == "ACDC"
    assert table.row_count == 3
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.700 ± 0.100" in text
    assert "mean_foreground" in text


def test_reserved_class_name_rejected() -> None:
    with pytest.raises(ValueError, match="reserved"):
        EvaluationResult([_row("a", "mean_foreground", 1.0, 0.0, 0.0)])


# --------------------------------------------------------------------------- #
# evaluate_folder
# --------------------------------------------------------------------------- #
CLASSES = {0: "background", 1: "lv", 2: "myo"}
GEOMETRY = Geometry(spacing=(0.7, 0.5, 3.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))


def _labels() -> np.ndarray:
    ref = np.zeros((6, 8, 8), dtype=np.uint8)
    ref[2] = 1  # one plane at z = 2 ...
    ref[:, 7, :] = 2
    return ref


def _write_pair(pred_dir: Path, ref_dir: Path, case: str, pred: np.ndarray, ref: np.ndarray,
                pred_geometry: Geometry = GEOMETRY) -> None:
    write_image(ref, GEOMETRY, ref_dir / f"{case}.nii.gz")
    write_image(pred, pred_geometry, pred_dir / f"{case}.nii.gz")


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    ref = _labels()
    shifted = ref.copy()
    shifted[2][ref[2] == 1] = 0
    shifted[4][ref[4] == 0] = 1  # ... predicted at z = 4: 2 voxels * 3 mm away
    _write_pair(pred_dir, ref_dir, "case_001", ref.copy(), ref)
    _write_pair(pred_dir, ref_dir, "case_002", shifted, ref)
    return pred_dir, ref_dir


def test_evaluate_folder_end_to_end(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    (ref_dir / "notes.txt").write_text("not an image")
    result = evaluate_folder(pred_dir, ref_dir, CLASSES)
    assert [(r["case"], r["class"]) for r in result.per_case] == [
        ("case_001", "lv"), ("case_001", "myo"), ("case_002", "lv"), ("case_002", "myo"),
    ]
    by_key = {(r["case"], r["class"]): r for r in result.per_case}
    assert by_key[("case_001", "lv")]["dice"] == pytest.approx(1.0)
    assert by_key[("case_001", "lv")]["hd95"] == 0.0
    lv2 = by_key[("case_002", "lv")]
    # z = 4 plane minus its row y = 7 (class 2) vs the z = 2 plane minus the same row: dice 0
    assert lv2["dice"] == 0.0
    assert lv2["hd95"] == pytest.approx(6.0)  # spacing taken from the reference, reversed to (z, y, x)
    assert lv2["asd"] == pytest.approx(6.0)
    summary = result.summary()
    assert summary["lv"]["dice_mean"] == pytest.approx(0.5)
    assert summary["lv"]["dice_std"] == pytest.approx(0.5)
    assert summary["myo"]["dice_mean"] == pytest.approx(1.0)
    assert result.save(tmp_path / "eval")["summary_json"].is_file()


def test_evaluate_folder_threads_and_case_subset(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    serial = evaluate_folder(pred_dir, ref_dir, CLASSES)
    threaded = evaluate_folder(pred_dir, ref_dir, CLASSES, num_workers=2, file_ending=".nii.gz")
    assert threaded.per_case == serial.per_case
    subset = evaluate_folder(pred_dir, ref_dir, {1: "lv"} | {2: "myo"}, case_ids=["case_002"])
    assert {r["case"] for r in subset.per_case} == {"case_002"}


def test_missing_prediction_names_the_case(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    (pred_dir / "case_002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_002"):
        evaluate_folder(pred_dir, ref_dir, CLASSES)


def test_missing_reference_names_the_file(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    write_image(_labels(), GEOMETRY, pred_dir / "case_003.nii.gz")
    with pytest.raises(FileNotFoundError, match="case_003"):
        evaluate_folder(pred_dir, ref_dir, CLASSES)
    with pytest.raises(FileNotFoundError, match="case_009"):
        evaluate_folder(pred_dir, ref_dir, CLASSES, case_ids=["case_001", "case_009"])


def test_geometry_mismatch_names_both_files(tmp_path: Path) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    moved = Geometry(spacing=GEOMETRY.spacing, origin=(5.0, 0.0, 0.0), direction=GEOMETRY.direction)
    _write_pair(pred_dir, ref_dir, "case_001", _labels(), _labels(), pred_geometry=moved)
    with pytest.raises(ValueError, match="geometry") as info:
        evaluate_folder(pred_dir, ref_dir, CLASSES)
    assert str(pred_dir / "case_001.nii.gz") in str(info.value)
    assert str(ref_dir / "case_001.nii.gz") in str(info.value)


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    _write_pair(pred_dir, ref_dir, "case_001", _labels()[:5], _labels())
    with pytest.raises(ValueError, match="shape") as info:
        evaluate_folder(pred_dir, ref_dir, CLASSES)
    assert "pred" in str(info.value) and "ref" in str(info.value)


def test_unknown_label_value_names_file_and_value(tmp_path: Path) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred = _labels()
    pred[0, 0, 0] = 7
    _write_pair(pred_dir, ref_dir, "case_001", pred, _labels())
    with pytest.raises(ValueError, match=r"\[7\]") as info:
        evaluate_folder(pred_dir, ref_dir, CLASSES)
    assert str(pred_dir / "case_001.nii.gz") in str(info.value)


def test_evaluate_folder_argument_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, ref_dir = folders
    with pytest.raises(ValueError, match="foreground"):
        evaluate_folder(pred_dir, ref_dir, {0: "background"})
    with pytest.raises(NotADirectoryError):
        evaluate_folder(tmp_path / "nope", ref_dir, CLASSES)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no reference"):
        evaluate_folder(empty, empty, CLASSES)


def test_evaluate_folder_2d_png_uses_reversed_spacing(tmp_path: Path) -> None:
    ref = np.zeros((10, 10), dtype=np.uint8)
    ref[2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[3:7, 2:6] = 1  # shifted one row (y) down; y spacing is 2 mm
    geometry = Geometry(spacing=(0.5, 2.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    write_image(ref, geometry, tmp_path / "ref" / "slice.png")
    write_image(pred, geometry, tmp_path / "pred" / "slice.png")
    (row,) = evaluate_folder(tmp_path / "pred", tmp_path / "ref", {1: "fg"}).per_case
    assert row["dice"] == pytest.approx(2 * 12 / 32)
    assert row["hd95"] == pytest.approx(2.0)


def test_uncertainty_maps_of_an_ensemble_are_not_predictions(folders: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = folders
    write_image(np.zeros((6, 8, 8), np.float32), GEOMETRY, pred_dir / "case_001_uncertainty.nii.gz")
    assert {r["case"] for r in evaluate_folder(pred_dir, ref_dir, CLASSES).per_case} == {"case_001", "case_002"}
    write_image(np.zeros((6, 8, 8), np.float32), GEOMETRY, pred_dir / "case_007_uncertainty.nii.gz")
    with pytest.raises(FileNotFoundError, match="case_007_uncertainty"):  # no CASE beside it: a real orphan
        evaluate_folder(pred_dir, ref_dir, CLASSES)
