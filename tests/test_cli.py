"""The command line: exit codes and messages for bad input, and the commands end to end."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from medkd.cli import app

runner = CliRunner()


def _broken_copy(src, dst):
    shutil.copytree(src, dst)
    first = sorted((dst / "imagesTr").iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    return first


def test_check_data_reports_each_problem_and_exits_1(phantoms_2d, tmp_path):
    bad = _broken_copy(phantoms_2d, tmp_path / "ds")
    result = runner.invoke(app, ["check-data", str(tmp_path / "ds")])
    assert result.exit_code == 1
    assert bad.name in result.output and "unreadable" in result.output
    ok = runner.invoke(app, ["check-data", str(phantoms_2d)])
    assert ok.exit_code == 0 and "passed" in ok.output


def test_train_refuses_a_bad_dataset(phantoms_2d, tmp_path):
    bad = _broken_copy(phantoms_2d, tmp_path / "ds")
    result = runner.invoke(app, ["train", "--dataset", str(tmp_path / "ds"), "--max-steps", "1",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and bad.name in result.output


@pytest.mark.parametrize("args,needle", [
    (["--set", "train.max_stepz=3"], "train.max_stepz"),
    (["--mode", "3d"], "patch_size"),
    (["--set", "nonsense"], "KEY=VALUE"),
])
def test_train_bad_config_names_the_key(phantoms_2d, tmp_path, args, needle):
    result = runner.invoke(app, ["train", "--dataset", str(phantoms_2d), "--max-steps", "1",
                                 "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and needle in result.output


def test_train_predict_evaluate_end_to_end(phantoms_2d, tmp_path):
    run = tmp_path / "run"
    common = ["--dataset", str(phantoms_2d), "--preset", "student", "--patch-size", "64,64", "--batch-size", "4",
              "--max-steps", "3", "--run-dir", str(run), "--num-workers", "0",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false"]
    assert runner.invoke(app, ["train", *common]).exit_code == 0
    again = runner.invoke(app, ["train", *common])
    assert again.exit_code == 1 and "already holds a run" in again.output
    assert runner.invoke(app, ["train", "--run-dir", str(run), "--resume"]).exit_code == 0
    pred = runner.invoke(app, ["predict", "--checkpoint", str(run / "best.pt"), "-i", str(phantoms_2d),
                               "-o", str(tmp_path / "pred"), "--save-probabilities"])
    assert pred.exit_code == 0, pred.output
    ev = runner.invoke(app, ["evaluate", str(tmp_path / "pred"), "--dataset", str(phantoms_2d)])
    assert ev.exit_code == 0, ev.output
    summary = json.loads((tmp_path / "pred" / "evaluation" / "summary.json").read_text())
    assert "lesion" in summary and "mean_foreground" in summary


def test_predict_with_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "nope.pt"), "-i", str(tmp_path),
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "nope.pt" in result.output


def test_models_lists_the_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ["unet", "basicunet", "dynunet", "segresnet", "attentionunet"]:
        assert name in result.output
