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


def _untrained_checkpoint(dataset_root, path, seed):
    import torch

    from medkd.data.dataset import load_dataset
    from medkd.data.preprocess import make_plan
    from medkd.storage import save_checkpoint
    from medkd.models import create

    dataset = load_dataset(dataset_root)
    torch.manual_seed(seed)
    model = create("unet", 2, dataset.num_channels, dataset.num_classes, preset="student")
    plan = make_plan(dataset, dataset.training[:2], mode="2d")
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                     "preprocessing": {"plan": plan.to_dict(), "patch_size": [32, 32]},
                     "labels": dict(dataset.labels)}, path)
    return path


def test_predict_and_evaluate_a_teacher_set(phantoms_2d, tmp_path):
    from medkd.data.dataset import load_dataset
    from medkd.data.io import read_image
    from medkd.teachers.manifest import TeacherMember, TeacherSet

    members = [TeacherMember(f"t{s}", _untrained_checkpoint(phantoms_2d, tmp_path / "set" / f"t{s}.pt", s))
               for s in (0, 1)]
    TeacherSet("uniform", members, dict(load_dataset(phantoms_2d).labels), tmp_path / "set").save(tmp_path / "set")
    pred = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "set"), "-i", str(phantoms_2d), "-o",
                                 str(pred), "--uncertainty", "--save-probabilities", "--combine", "mean_logits"])
    assert result.exit_code == 0, result.output
    assert "2 combined member(s)" in result.output
    cases = sorted(p.name[: -len("_0000.png")] for p in (phantoms_2d / "imagesTs").iterdir())
    for case in cases:
        seg, geometry = read_image(pred / f"{case}.png")
        spread, spread_geometry = read_image(pred / f"{case}_uncertainty.nii.gz")  # PNG cannot hold floats
        assert spread.shape == seg.shape and spread.dtype == "float32" and spread_geometry == geometry
        assert (pred / f"{case}.npz").is_file()
    ev = runner.invoke(app, ["evaluate", str(pred), "--dataset", str(phantoms_2d)])
    assert ev.exit_code == 0, ev.output  # the uncertainty maps are not taken for predictions
    assert sorted({r.split(",")[0] for r in (pred / "evaluation" / "per_case.csv").read_text().splitlines()[1:]}) \
        == cases


def test_predict_uncertainty_needs_a_teacher_set(phantoms_2d, tmp_path):
    ckpt = _untrained_checkpoint(phantoms_2d, tmp_path / "one.pt", 0)
    result = runner.invoke(app, ["predict", "--checkpoint", str(ckpt), "-i", str(phantoms_2d),
                                 "-o", str(tmp_path / "o"), "--uncertainty"])
    assert result.exit_code == 1 and "at least 2 members" in result.output and "one.pt" in result.output
    assert not (tmp_path / "o").exists()
    bad = runner.invoke(app, ["predict", "--checkpoint", str(ckpt), "-i", str(phantoms_2d),
                              "-o", str(tmp_path / "o"), "--combine", "vote"])
    assert bad.exit_code == 1 and "mean_prob, mean_logits" in bad.output


def test_check_data_lists_warnings_but_exits_1_only_on_errors(phantoms_2d, tmp_path):
    import numpy as np

    from medkd.data.io import read_image, write_image

    root = tmp_path / "ds"
    shutil.copytree(phantoms_2d, root)
    first = sorted((root / "imagesTr").iterdir())[0]
    image, geometry = read_image(first)
    write_image(np.zeros_like(image), geometry, first)
    result = runner.invoke(app, ["check-data", str(root)])
    assert result.exit_code == 0, result.output
    assert "warning [constant-image]" in result.output and first.name in result.output
    assert "passed all checks with 1 warning(s)" in result.output
    (root / "splits_final.json").write_text(json.dumps([{"train": ["phantom_000"], "val": ["phantom_000"]}]))
    bad = runner.invoke(app, ["check-data", str(root)])
    assert bad.exit_code == 1 and "[bad-splits]" in bad.output and "splits_final.json" in bad.output
    assert "1 error(s), 1 warning(s)" in bad.output


def test_predict_names_the_image_holding_nan(phantoms_2d, tmp_path):
    import numpy as np

    from medkd.data.io import read_image, write_image

    ckpt = _untrained_checkpoint(phantoms_2d, tmp_path / "one.pt", 0)
    folder = tmp_path / "in"
    source = sorted((phantoms_2d / "imagesTs").iterdir())[0]
    image, geometry = read_image(source)
    image = image.astype(np.float32)
    image[3, 4] = np.nan
    bad = folder / source.name.replace(".png", ".nii.gz")
    write_image(image, geometry, bad)
    result = runner.invoke(app, ["predict", "--checkpoint", str(ckpt), "-i", str(folder), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{bad}: image holds 1 NaN/Inf voxel(s)" in result.output.replace("\n", "")
