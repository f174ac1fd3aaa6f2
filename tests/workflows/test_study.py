"""A study file with a typo, a missing dataset, an unknown recipe or model fails before any training, naming the key."""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import ConfigError
from medkd.workflows.experiment import run_study
from medkd.workflows.study import load_study


def _study(dataset) -> dict:
    return {"dataset": str(dataset), "data": {"patch_size": [64, 64], "batch_size": 2, "num_workers": 0},
            "teacher": {"model": {"name": "unet", "preset": "student"}, "steps": 2},
            "students": [{"name": "tiny", "model": {"name": "unet", "shrink": 4}}],
            "recipes": ["logit-kd"], "seeds": [0], "budgets": [{"steps": 2}]}


def _write(tmp_path, tree) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _edit(tree: dict, dotted: str, value) -> dict:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[leaf] = value
    return tree


CASES = [
    ("seedz", [0], "seedz"),                                     # typo at the top level
    ("students.0.model.shrinkk", 4, "students.0.model.shrinkk"),  # typo in a nested model
    ("teacher.stepz", 2, "teacher.stepz"),
    ("dataset", "no/such/Dataset", "dataset"),                  # missing dataset
    ("recipes", ["logit-kd", "no-such-kd"], "recipes.1"),       # unknown recipe
    ("students.0.model.name", "unett", "students.0.model.name"),  # unknown model
    ("data.patch_sise", [64, 64], "data.patch_sise"),           # typo in a shared run-config key
    ("train.max_steps", 5, "train.max_steps"),                  # set by the study (budgets)
    ("budgets", [{}], "budgets.0"),
    ("unlabeled", ["no/such/folder"], "unlabeled.0"),
    ("teacher.path", "no/such/best.pt", "teacher"),             # both path and model
    ("teacher.data.dataset", "x", "teacher.data"),      # set by the study, also for the teacher
    ("teacher.train.val_evry", 5, "teacher.train"),    # typo in a teacher-only run-config key
]


@pytest.mark.parametrize("key,value,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_study_fails_before_training_naming_the_key(phantoms_2d, tmp_path, key, value, needle):
    path = _write(tmp_path, _edit(_study(phantoms_2d), key, value))
    with pytest.raises(ConfigError) as err:
        run_study(path, tmp_path / "out")
    assert needle in str(err.value) and "study.yaml" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_missing_teacher_path_names_the_key(phantoms_2d, tmp_path):
    tree = _study(phantoms_2d)
    tree["teacher"] = {"path": "runs/none"}
    with pytest.raises(ConfigError, match="teacher.path"):
        load_study(_write(tmp_path, tree))


def test_cli_reports_a_bad_study_in_one_line(phantoms_2d, tmp_path):
    path = _write(tmp_path, _edit(_study(phantoms_2d), "recipes", ["logit-kdd"]))
    result = CliRunner().invoke(app, ["experiment", path, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "recipes.0" in result.output and "logit-kdd" in result.output and "Traceback" not in result.output


def test_relative_paths_are_relative_to_the_study_file(phantoms_2d, tmp_path):
    tree = _study(phantoms_2d)
    (tmp_path / "sub").mkdir()
    tree["dataset"] = os.path.relpath(phantoms_2d, tmp_path / "sub")
    study = load_study(_write(tmp_path / "sub", tree))
    assert study.dataset.resolve() == phantoms_2d.resolve() and study.label_settings() == [("all", {})]
    assert study.students[0].model.preset == "student"  # a student model defaults to the student preset


def test_report_of_a_folder_that_is_no_study_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "study.yaml" in result.output and "Traceback" not in result.output


def test_teacher_only_keys_apply_to_the_teacher_alone(phantoms_2d, tmp_path):
    from medkd.workflows.experiment import plan_runs

    tree = _study(phantoms_2d)
    tree["teacher"].update(data={"batch_size": 4}, train={"val_every": 7})
    study = load_study(_write(tmp_path, tree))
    runs = {r.run_id: r.tree for r in plan_runs(study, tmp_path / "out")}
    teacher = runs.pop("teacher__all")
    assert teacher["data"]["batch_size"] == 4 and teacher["train"]["val_every"] == 7
    assert all(t["data"]["batch_size"] == 2 and "val_every" not in t["train"] for t in runs.values())
