"""Distillation from an imported nnU-Net teacher: a feature recipe (reco-kd) on nnU-Net's grid, and cached
logit targets mapped onto a student that keeps medkd's own preprocessing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import build_config
from medkd.data.preprocess import to_preprocessed_grid
from medkd.engine.data_setup import prepare_training_data
from medkd.engine.inference import Predictor, read_case
from medkd.engine.teacher_grid import case_image_files
from medkd.storage import load_checkpoint
from medkd.teachers.combine import target_logits
from medkd.workflows.distill import distill_config
from medkd.workflows.nnunet_import import import_nnunet
from tests.nnunet_results import make_results, plans

runner = CliRunner()
COMMON = ["--max-steps", "3", "--set", "train.log_every=1", "--set", "train.progress=false", "--set",
          "train.tensorboard=false", "--set", "train.val_every=1000", "--set", "data.batch_size=2",
          "--num-workers", "0"]


@pytest.fixture(scope="module")
def nnunet_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnkd")
    # a plan whose grid is not medkd's: in-plane spacing 0.8 (medkd keeps 1.0) and rescale-to-[0, 1]
    plan = plans(scheme="RescaleTo01Normalization", spacing_2d=(0.8, 0.8))
    results = make_results(root / "results", "2d", folds=(0, 1), plan=plan)
    return import_nnunet(results, "2d", [0, 1], root / "teachers").source.parent


def test_reco_kd_from_an_nnunet_teacher_into_a_unet_student(nnunet_teacher, phantoms_2d, tmp_path):
    run = tmp_path / "reco"
    result = runner.invoke(app, ["distill", "--teacher", str(nnunet_teacher), "--recipe", "reco-kd", "--dataset",
                                 str(phantoms_2d), "--set", f"data.cache_dir={tmp_path / 'cache'}", *COMMON,
                                 "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    state = load_checkpoint(run / "last.pt")
    assert state["model_spec"]["name"] == "unet" and state["extra_state"]  # ReCo-KD adapters trained
    assert state["config"]["data"]["preprocessing_from"] == str(nnunet_teacher)
    assert state["preprocessing"]["plan"]["nnunet"]["spacing"] == [0.8, 0.8]  # the student saw nnU-Net's grid
    with open(run / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and {"ms_sard", "ms_ca"} <= set(rows[0])
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_feature_recipe_on_another_grid_is_refused(nnunet_teacher, phantoms_2d, tmp_path):
    result = runner.invoke(app, ["distill", "--teacher", str(nnunet_teacher), "--recipe", "reco-kd", "--dataset",
                                 str(phantoms_2d), "--set", "data.preprocessing_from=null", "--set",
                                 f"data.cache_dir={tmp_path / 'cache'}", *COMMON, "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "data.preprocessing_from" in " ".join(result.output.split())


def test_cached_targets_are_mapped_onto_the_students_own_grid(nnunet_teacher, phantoms_2d, tmp_path):
    overrides = {"data.dataset": str(phantoms_2d), "data.preprocessing_from": None, "data.num_workers": 0,
                 "data.cache_dir": str(tmp_path / "cache"), "data.batch_size": 2, "train.max_steps": 2,
                 "train.val_every": 1000, "train.progress": False, "train.tensorboard": False}
    cfg = distill_config(nnunet_teacher, "unet", "logit-kd", overrides)
    assert cfg.data.preprocessing_from is None
    from medkd.engine.trainer import train

    train(cfg, tmp_path / "run")
    data = prepare_training_data(cfg.data, seed=cfg.train.seed, with_unlabeled=True)
    assert data.plan.nnunet is None
    folders = list((tmp_path / "cache" / "teacher_outputs").iterdir())
    assert len(folders) == 1
    case = data.train[0]
    cached = np.load(folders[0] / f"{case.case_id}_t.npy").astype(np.float32)
    assert cached.shape[1:] == case.load_image().shape[1:]  # the student's grid
    # by hand: each fold predicts on the original grid through nnU-Net's preprocessing, mapped to the
    # student's grid, combined by the cached rule at its temperature
    image, geometry = read_case(case_image_files(case, 1))
    members = [to_preprocessed_grid(Predictor(p, postprocess=False).predict_arrays(image, geometry),
                                    case.properties) for p in sorted(nnunet_teacher.glob("members/*/best.pt"))]
    spec = json.loads((folders[0] / "meta.json").read_text())["target"]
    stack = torch.from_numpy(np.log(np.maximum(np.stack(members), 1e-38)).astype(np.float32))[:, None]
    expected = target_logits(spec["rule"], stack, spec["temperature"])[0]
    assert torch.allclose(torch.from_numpy(cached), expected, atol=2e-2, rtol=1e-2)  # float16 storage


def test_import_then_distill_config_defaults(nnunet_teacher):
    cfg = build_config(distill_config(nnunet_teacher, "unet", "logit-kd").model_dump(mode="json"))
    assert cfg.data.mode == "2d" and cfg.data.patch_size == [64, 64]
    assert str(cfg.data.preprocessing_from) == str(nnunet_teacher)


SHIPPED_RECIPES = ["cwd", "mtms-contrastive", "prostate-kd", "reco-kd", "skd", "adaptive-multi-teacher",
                   "balanced-kd", "ensemble-kd", "logit-kd", "pseudo-kd"]


@pytest.mark.parametrize("recipe_name", SHIPPED_RECIPES)
@pytest.mark.parametrize("residual", [False, True], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_every_recipe_runs_live_from_an_nnunet_teacher(recipe_name, residual):
    """Every shipped recipe (feature terms paired by resolution) from nnU-Net U-Nets into a MONAI UNet student."""
    from medkd.engine.distill import Distiller
    from medkd.models import create
    from medkd.recipes import load_recipe
    from tests.nnunet_results import architecture

    recipe = load_recipe(recipe_name)
    arch = architecture(2, residual, features=(8, 16, 32, 32))
    entry = {"network_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
             "kw_requires_import": arch["_kw_requires_import"]}
    torch.manual_seed(0)
    teachers = [create("nnunet", 2, 1, 3, **entry) for _ in range(2 if recipe.needs_uncertainty else 1)]
    student = create("unet", 2, 1, 3, preset="student")
    distiller = Distiller(student, teachers, recipe, spatial_dims=2, in_channels=1, num_classes=3)
    batch = {"image": torch.randn(2, 1, 64, 64), "label": torch.randint(0, 3, (2, 1, 64, 64))}
    terms = distiller(batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert all(p.grad is None for t in distiller.teachers for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    if recipe.needs_teacher_features:
        assert any(name.startswith(("encoder.stages", "decoder.stages")) for pairs in distiller.taps.values()
                   for _, teacher_names in pairs for name in teacher_names)
