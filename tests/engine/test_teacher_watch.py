"""Distillation says the teacher's validation Dice and warns once when the student passes it."""

from __future__ import annotations

import json
import logging

from typer.testing import CliRunner

from medkd.config import build_config
from medkd.engine.teacher_watch import TeacherDiceWatch
from medkd.engine.trainer import train
from medkd.storage import load_checkpoint, save_checkpoint


def test_watch_warns_once_with_both_figures():
    lines = []
    watch = TeacherDiceWatch(0.70, warn=lines.append)
    watch.check(0.65, 100)
    assert not lines
    watch.check(0.72, 200)
    watch.check(0.75, 300)
    assert len(lines) == 1 and "0.7200" in lines[0] and "0.7000" in lines[0] and "step 200" in lines[0]
    assert watch.passed == {"step": 200, "student_val_dice": 0.72}
    TeacherDiceWatch(None, warn=lines.append).check(0.9, 1)  # unknown teacher Dice: nothing to compare
    assert len(lines) == 1


def test_distill_reports_a_weaker_teacher_and_resumes_with_only_the_run_dir(phantoms_2d, tmp_path, tiny_config,
                                                                            caplog):
    train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=1)), tmp_path / "teacher")
    best = tmp_path / "teacher" / "best.pt"
    state = load_checkpoint(best)
    state["best_metric"] = -0.5  # a teacher any student passes
    save_checkpoint(state, best)
    from medkd.cli import app

    args = ["distill", "--teacher", str(best), "--max-steps", "2", "--set", "train.progress=false",
            "--run-dir", str(tmp_path / "s")]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best validation Dice of the teacher -0.5000" in result.output
    warnings = [r.getMessage() for r in caplog.records if "has passed its teacher's -0.5000" in r.getMessage()]
    assert len(warnings) == 1
    summary = json.loads((tmp_path / "s" / "result.json").read_text())
    assert summary["teacher_val_dice"] == -0.5 and summary["student_passed_teacher"]["step"] == 2
    resumed = CliRunner().invoke(app, ["distill", "--resume", "--run-dir", str(tmp_path / "s")])
    assert resumed.exit_code == 0, resumed.output
    missing = CliRunner().invoke(app, ["distill", "--max-steps", "1", "--run-dir", str(tmp_path / "t")])
    assert missing.exit_code == 1 and "--teacher" in missing.output
