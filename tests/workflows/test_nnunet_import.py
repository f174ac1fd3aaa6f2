"""`medkd import-nnunet`: an nnU-Net v2 results folder (real plans schema, random weights saved as nnU-Net
saves them) becomes a teacher set whose networks give the logits of the networks built directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.engine.ensemble import load_predictor
from medkd.engine.inference import Predictor, read_case
from medkd.teachers.manifest import load_frozen, open_teachers
from medkd.workflows.nnunet_import import import_nnunet
from tests.nnunet_results import make_results, network, plans

runner = CliRunner()


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("nn") / "nnUNetTrainer__nnUNetPlans__2d", "2d", folds=(0, 1))


@pytest.mark.parametrize("configuration,residual", [("2d", False), ("2d", True), ("3d_fullres", False),
                                                    ("3d_lowres", True)])
def test_imported_logits_equal_the_network_built_directly(tmp_path, configuration, residual):
    plan = plans(residual=residual)
    results = make_results(tmp_path / "results", configuration, folds=(0, 3), plan=plan)
    teachers = import_nnunet(results, configuration, [0, 3], tmp_path / "set")
    assert teachers.kind == "nnunet" and [m.name for m in teachers.members] == ["fold_0", "fold_3"]
    shape = (2, 1, 64, 64) if configuration == "2d" else (1, 1, 16, 32, 32)
    x = torch.randn(shape)
    for member, seed in zip(teachers.members, (0, 3)):
        imported, state = load_frozen(member.checkpoint)
        direct = network(plan, configuration, seed, deep_supervision=False).eval()
        with torch.no_grad():
            expected, got = direct(x), imported(x)
        assert got.shape == (shape[0], 5, *shape[2:])
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
        assert state["mirror_axes"] == [0, 1] and state["nnunet"]["configuration"] == configuration
        assert state["preprocessing"]["plan"]["nnunet"]["transpose_forward"] == [0, 1, 2]
    loaded = torch.load(teachers.members[0].checkpoint, weights_only=True)  # medkd checkpoints load weights-only
    assert loaded["model_spec"]["name"] == "nnunet"


def test_predict_runs_nnunet_preprocessing_and_allowed_mirroring(results_2d, phantoms_2d, tmp_path):
    teachers = import_nnunet(results_2d, "2d", [0, 1], tmp_path / "set")
    files = sorted((phantoms_2d / "imagesTs").iterdir())[:1]
    image, geometry = read_case(files)
    member = Predictor(teachers.members[0].checkpoint, tta=True)
    probs = member.predict_arrays(image, geometry)
    assert probs.shape == (5, *image.shape[1:]) and np.allclose(probs.sum(0), 1, atol=1e-4)
    # by hand: nnU-Net's z-score of the (uncropped: no zeros) image, the network, the softmax of the logits
    # averaged over the mirrorings of the axes the checkpoint allows (0 and 1), as nnU-Net predicts
    x = torch.from_numpy((image - image.mean()) / image.std()).float()[None]
    net, _ = load_frozen(teachers.members[0].checkpoint)
    with torch.no_grad():
        flips = [(), (2,), (3,), (2, 3)]
        expected = torch.softmax(sum(net(torch.flip(x, f)).flip(f) if f else net(x) for f in flips) / 4, 1)
    assert np.abs(probs - expected[0].numpy()).max() < 1e-4
    member.mirror_axes = [1]  # a checkpoint allowing only the last axis: 2 mirrorings instead of 4
    assert np.abs(member.predict_arrays(image, geometry) - probs).max() > 1e-6
    ensemble = load_predictor(tmp_path / "set")
    assert ensemble.num_members == 2 and ensemble.predict_arrays(image, geometry).shape == probs.shape
    result = runner.invoke(app, ["predict", "-i", str(phantoms_2d), "-o", str(tmp_path / "pred"), "--checkpoint",
                                 str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(list((phantoms_2d / "imagesTs").iterdir()))


def test_cli_imports_and_refuses_a_non_empty_folder(results_2d, tmp_path):
    out = tmp_path / "set"
    result = runner.invoke(app, ["import-nnunet", str(results_2d), "--configuration", "2d", "--folds", "0,1",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "imported 2 fold(s)" in result.output
    assert json.loads((out / "teachers.json").read_text())["kind"] == "nnunet"
    assert (out / "nnunet" / "plans.json").is_file()
    again = runner.invoke(app, ["import-nnunet", str(results_2d), "--configuration", "2d", "--folds", "0",
                                "-o", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output
    forced = runner.invoke(app, ["import-nnunet", str(results_2d), "--configuration", "2d", "--folds", "1",
                                 "--force", "-o", str(out)])
    assert forced.exit_code == 0, forced.output
    assert [m.name for m in open_teachers(out).members] == ["fold_1"]


class _NotWeights:  # a class the weights-only unpickler refuses
    def __init__(self):
        self.x = 1


def _bad_results(kind, tmp_path, results_2d):
    root = tmp_path / "bad"
    shutil.copytree(results_2d, root)
    plan = json.loads((root / "plans.json").read_text())
    if kind == "not_results":
        (root / "plans.json").unlink()
        return root, "plans.json"
    if kind == "missing_fold":
        shutil.rmtree(root / "fold_1")
        return root, "fold_1"
    if kind == "missing_configuration":
        del plan["configurations"]["2d"]
    elif kind == "unknown_class":
        plan["configurations"]["2d"]["architecture"]["network_class_name"] = "my_package.MyUNet"
    elif kind == "bad_import":
        plan["configurations"]["2d"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    elif kind == "pickle_code":
        state = torch.load(root / "fold_1" / "checkpoint_final.pth", weights_only=False)
        state["trainer_extra"] = _NotWeights()
        torch.save(state, root / "fold_1" / "checkpoint_final.pth")
        return root, "fold_1/checkpoint_final.pth"
    elif kind == "wrong_weights":
        plan["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 8, 16, 16]
    (root / "plans.json").write_text(json.dumps(plan))
    return root, {"missing_configuration": "configurations.2d", "unknown_class": "network_class_name",
                  "bad_import": "arch_kwargs.nonlin", "wrong_weights": "network_weights"}[kind]


@pytest.mark.parametrize("kind", ["not_results", "missing_fold", "missing_configuration", "unknown_class",
                                  "bad_import", "pickle_code", "wrong_weights"])
def test_bad_input_is_named_and_nothing_is_written(kind, tmp_path, results_2d):
    root, key = _bad_results(kind, tmp_path, results_2d)
    out = tmp_path / "out"
    result = runner.invoke(app, ["import-nnunet", str(root), "--configuration", "2d", "--folds", "0",
                                 "--folds", "1", "-o", str(out)])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and key in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]
    print(message)


def test_export_refuses_a_checkpoint_with_nnunet_preprocessing(results_2d, tmp_path):
    teachers = import_nnunet(results_2d, "2d", [0], tmp_path / "set")
    result = runner.invoke(app, ["export", str(teachers.members[0].checkpoint), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "nnU-Net plan" in " ".join(result.output.split())
    assert not (tmp_path / "bundle").exists()
