from __future__ import annotations

import csv

import pytest
from rich.console import Console

from medkd.workflows.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_with_tiny_budgets(tmp_path):
    console = Console(width=160, record=True)
    out = run_demo(tmp_path, teacher_steps=3, student_steps=2, console=console)
    printed = console.export_text()
    for recipe in ("balanced-kd", "logit-kd"):  # a verdict per recipe, win or loss, with its numbers
        assert any(line.startswith(f"student+{recipe} ") and "Wilcoxon p=" in line and "gap" in line
                   and "per class: organ" in line
                   for line in printed.splitlines()), printed
    with open(out / "summary.csv") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"teacher", "student", "student+balanced-kd", "student+logit-kd"}
    assert int(rows["teacher"]["params"]) >= 10 * int(rows["student"]["params"])
    for row in rows.values():
        assert 0.0 <= float(row["mean_dice"]) <= 1.0 and float(row["latency_ms"]) > 0
    assert (out / "teacher" / "best.pt").is_file() and (out / "student" / "best.pt").is_file()
