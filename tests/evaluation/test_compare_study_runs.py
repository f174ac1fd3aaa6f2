"""benchmarks/compare_study_runs.py: two students of a study, paired per case, on a hand-made results.csv."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["run", "role", "student", "method", "seed", "budget", "view", "labels", "case", "class", "dice",
           "hd95", "asd"]


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_study_runs", REPO / "benchmarks" / "compare_study_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_results(path: Path) -> None:
    """Student b is 0.1 better than a on case c0 and c1 and 0.05 worse on c2, at seeds 0 and 1; b's seed-2
    run has no twin in a and must be left out; class 'x' of case c2 is NaN (absent) and must be skipped."""
    rows = []
    for student, shift in (("a", 0.0), ("b", 1.0)):
        for seed in ("0", "1") + (("2",) if student == "b" else ()):
            for case, base, diff in (("c0", 0.5, 0.1), ("c1", 0.6, 0.1), ("c2", 0.7, -0.05)):
                for cls, value in (("x", base + shift * diff), ("y", base + shift * diff)):
                    dice = "nan" if (case == "c2" and cls == "x") else f"{value + (0.3 if seed == '2' else 0)}"
                    rows.append([f"{student}__kd__s{seed}", "student", student, "kd", seed, "steps10", "equal steps",
                                 "all", case, cls, dice, "1", "1"])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def test_compares_the_students_per_case_on_shared_seeds(tmp_path):
    _write_results(tmp_path / "results.csv")
    (row,) = _load_script().compare(tmp_path, "a", "b")
    assert row["method"] == "kd" and row["seeds"] == 2 and row["n"] == 3
    assert row["delta"] == pytest.approx((0.1 + 0.1 - 0.05) / 3)
    assert row["wins"] == 2
    assert row["a"][0] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert row["b"][0] == pytest.approx((0.6 + 0.7 + 0.65) / 3)


def test_unknown_student_is_a_clear_error(tmp_path):
    _write_results(tmp_path / "results.csv")
    with pytest.raises(SystemExit, match="no evaluated run of student 'zz'"):
        _load_script().compare(tmp_path, "a", "zz")
    with pytest.raises(SystemExit, match="results.csv not found"):
        _load_script().compare(tmp_path / "missing", "a", "b")
