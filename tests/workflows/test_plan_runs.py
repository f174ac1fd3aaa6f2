"""Runs configured from a plan: `--plan --configuration`, or planned from the dataset; explicit settings win."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import ConfigError
from medkd.workflows.plan import make_plans, planned_overrides, write_plans

runner = CliRunner()


def _overrides(dataset, cache, **extra):
    return {"data.dataset": str(dataset), "data.cache_dir": str(cache), **extra}


def test_a_plan_fills_what_flags_and_config_file_leave_open(phantoms_3d, tmp_path):
    plans = make_plans(phantoms_3d, cache_dir=tmp_path / "cache")
    full = plans["configurations"]["3d_fullres"]
    path = write_plans(plans, tmp_path / "plans.json")
    got = planned_overrides(_overrides(phantoms_3d, tmp_path / "cache"), {}, plan=path, configuration="3d_fullres",
                            note=lambda _: None)
    assert got["data.mode"] == "3d" and got["data.patch_size"] == full["patch_size"]
    assert got["data.batch_size"] == full["batch_size"] and got["data.target_spacing"] == full["target_spacing"]
    assert got["model.kwargs"]["strides"] == full["teacher"]["strides"]
    assert got["model.shrink"] == full["teacher"]["shrink"]
    assert got["plan"]["configuration"] == "3d_fullres"
    flags = planned_overrides(_overrides(phantoms_3d, tmp_path / "cache", **{"data.batch_size": 5}),
                              {"data": {"patch_size": [16, 32, 32]}}, plan=path, configuration="3d_fullres",
                              note=lambda _: None)
    assert flags["data.batch_size"] == 5 and "data.patch_size" not in flags  # the file's value stays
    student = planned_overrides(_overrides(phantoms_3d, tmp_path / "cache", **{"model.preset": "student"}), {},
                                plan=path, configuration="3d_fullres", note=lambda _: None)
    assert student["model.shrink"] == full["student"]["shrink"]
    other = planned_overrides(_overrides(phantoms_3d, tmp_path / "cache", **{"model.name": "segresnet"}), {},
                              plan=path, configuration="2d", note=lambda _: None)
    assert "model.kwargs" not in other and other["data.mode"] == "2d"
    odd = planned_overrides(_overrides(phantoms_3d, tmp_path / "cache", **{"data.patch_size": [24, 44, 44],
                                                                          "model.shrink": 2}), {},
                            plan=path, configuration="3d_fullres", note=lambda _: None)
    assert "model.kwargs" not in odd and odd["model.shrink"] == 2  # strides that do not divide: registry defaults
    with pytest.raises(ConfigError, match="3d_lowres"):
        planned_overrides(_overrides(phantoms_3d, tmp_path / "cache"), {}, plan=path, configuration="3d_lowres")
    with pytest.raises(ConfigError, match="contradicts"):
        planned_overrides(_overrides(phantoms_3d, tmp_path / "cache", **{"data.mode": "3d"}), {}, plan=path,
                          configuration="2d")


def test_train_without_a_plan_plans_and_stores_it_in_the_run(phantoms_2d, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", str(phantoms_2d), "--preset", "student", "--max-steps", "2",
                                 "--run-dir", str(run), "--num-workers", "0", "--set",
                                 f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    assert "plan: configuration 2d" in result.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    planned = config["plan"]["plans"]["configurations"]["2d"]
    assert config["plan"]["configuration"] == "2d"
    assert config["data"]["patch_size"] == planned["patch_size"] and config["data"]["batch_size"] == planned["batch_size"]
    assert config["model"]["kwargs"]["channels"] == planned["student"]["channels"]
    assert json.loads((run / "result.json").read_text())["steps"] == 2


def test_distill_takes_the_student_network_from_the_teachers_plan(phantoms_2d, tmp_path):
    common = ["--max-steps", "1", "--num-workers", "0", "--set", f"data.cache_dir={tmp_path / 'cache'}",
              "--set", "train.progress=false"]
    teacher = tmp_path / "teacher"
    result = runner.invoke(app, ["train", "--dataset", str(phantoms_2d), "--run-dir", str(teacher), *common])
    assert result.exit_code == 0, result.output
    student = tmp_path / "student"
    result = runner.invoke(app, ["distill", "--teacher", str(teacher / "best.pt"), "--run-dir", str(student), *common])
    assert result.exit_code == 0, result.output
    assert "the teacher's plan" in result.output
    taught, learnt = (yaml.safe_load((run / "config.yaml").read_text()) for run in (teacher, student))
    planned = taught["plan"]["plans"]["configurations"]["2d"]
    assert learnt["plan"] == taught["plan"]
    assert learnt["model"]["shrink"] == planned["student"]["shrink"] and learnt["model"]["preset"] == "student"
    assert learnt["data"]["patch_size"] == taught["data"]["patch_size"] == planned["patch_size"]
