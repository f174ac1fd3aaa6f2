"""benchmarks/compare_study_runs.py: two students of a study, paired per case, on a hand-made study folder."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_COLUMNS = ["run", "role", "student", "method", "seed", "budget", "view", "labels", "test_dice"]
CASE_COLUMNS = ["case", "class", "dice"]


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_study_runs", REPO / "benchmarks" / "compare_study_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def _write_study(study: Path) -> None:
    """A study folder as ``medkd experiment`` leaves it (runs.csv, eval/<run>/per_case.csv). Student b is 0.1
    better than a on case c0 and c1 and 0.05 worse on c2, at seeds 0 and 1; b's seed-2 run has no twin in a and
    must be left out; class 'x' of case c2 is NaN (absent) and must be skipped."""
    runs = []
    for student, shift in (("a", 0.0), ("b", 1.0)):
        for seed in ("0", "1") + (("2",) if student == "b" else ()):
            run = f"{student}__kd__s{seed}"
            cases, case_means = [], []
            for case, base, diff in (("c0", 0.5, 0.1), ("c1", 0.6, 0.1), ("c2", 0.7, -0.05)):
                value = base + shift * diff + (0.3 if seed == "2" else 0)
                cases += [[case, cls, "nan" if (case == "c2" and cls == "x") else f"{value}"] for cls in ("x", "y")]
                case_means.append(value)
            _write_csv(study / "eval" / run / "per_case.csv", CASE_COLUMNS, cases)
            runs.append([run, "student", student, "kd", seed, "steps10", "equal steps", "all",
                         sum(case_means) / len(case_means)])
    _write_csv(study / "runs.csv", RUN_COLUMNS, runs)


def test_compares_the_students_per_case_on_shared_seeds(tmp_path):
    _write_study(tmp_path)
    (row,) = _load_script().compare(tmp_path, "a", "b")
    assert row["method"] == "kd" and row["seeds"] == 2 and row["n"] == 3
    assert row["delta"] == pytest.approx((0.1 + 0.1 - 0.05) / 3)
    assert row["wins"] == 2
    assert row["a"][0] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert row["b"][0] == pytest.approx((0.6 + 0.7 + 0.65) / 3)


def test_unknown_student_is_a_clear_error(tmp_path):
    _write_study(tmp_path)
    with pytest.raises(SystemExit, match="no evaluated run of student 'zz'"):
        _load_script().compare(tmp_path, "a", "zz")
    with pytest.raises(SystemExit, match="runs.csv not found"):
        _load_script().compare(tmp_path / "missing", "a", "b")
