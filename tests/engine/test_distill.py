"""Distillation task: every shipped recipe builds, trains only the student side, and runs in the trainer."""

from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from medkd.config import build_config
from medkd.engine.distill import Distiller, TeacherMismatchError, check_teacher
from medkd.engine.trainer import Trainer, train
from medkd.models import create
from medkd.recipes import list_recipes, load_recipe, recipe_from_dict
from medkd.storage import load_checkpoint

SHIPPED = ["adaptive-multi-teacher", "balanced-kd", "cwd", "ensemble-kd", "logit-kd", "mtms-contrastive", "prostate-kd",
           "pseudo-kd", "reco-kd", "skd"]


def test_all_recipes_ship_and_validate():
    assert set(SHIPPED) <= set(list_recipes())
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.paper and recipe.terms


def test_bad_recipe_names_the_key():
    from medkd.config import ConfigError

    with pytest.raises(ConfigError, match="terms.x.loss"):
        recipe_from_dict({"name": "r", "paper": "p", "terms": {"x": {"loss": "nope", "weight": 1}}})
    with pytest.raises(ConfigError, match="feature taps"):
        recipe_from_dict({"name": "r", "paper": "p", "terms": {"f": {"loss": "feature", "weight": 1}}})
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("recipe_name", SHIPPED)
@pytest.mark.parametrize("dims", [2, 3])
def test_distiller_gradients_reach_student_and_adapters_only(recipe_name, dims):
    torch.manual_seed(0)
    teacher = create("unet", dims, 1, 3, preset="teacher", shrink=2 if dims == 2 else 3)
    student = create("basicunet" if recipe_name == "reco-kd" else "unet", dims, 1, 3, preset="student")
    distiller = Distiller(student, teacher, load_recipe(recipe_name), spatial_dims=dims, in_channels=1, num_classes=3)
    distiller.train()
    assert not distiller.teacher.training
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 16, 32, 32)
    label = torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.long)
    label[..., 8:20, 8:20] = 1
    label[..., 12:16, 12:16] = 2
    terms = distiller({"image": torch.randn(shape), "label": label})
    assert set(terms) == {"loss", "seg", *load_recipe(recipe_name).terms}
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.network.parameters())
    extra = [p for p in distiller.extra_modules().parameters() if p.requires_grad]
    if extra:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)


def test_teacher_mismatch_is_reported():
    state = {"model_spec": {"in_channels": 2, "spatial_dims": 3}, "labels": {"background": 0, "a": 1}}
    with pytest.raises(TeacherMismatchError, match="input channel"):
        check_teacher(state, {"background": 0, "a": 1}, in_channels=1, spatial_dims=3, source="t.pt")
    with pytest.raises(TeacherMismatchError, match="labels"):
        check_teacher(state, {"background": 0, "b": 1}, in_channels=2, spatial_dims=3, source="t.pt")


@pytest.mark.slow
def test_distill_cli_lowers_loss_and_resumes(phantoms_2d, tmp_path, tiny_config, interrupt_at):
    teacher_cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=30, lr=0.01))
    teacher_cfg.model.preset, teacher_cfg.model.shrink = "teacher", 2
    train(teacher_cfg, tmp_path / "teacher")
    common = ["--teacher", str(tmp_path / "teacher" / "best.pt"), "--recipe", "reco-kd", "--max-steps", "6",
              "--set", "train.checkpoint_every=3", "--set", "train.log_every=1", "--set", "train.progress=false",
              "--set", "train.tensorboard=false", "--set", "train.seed=3", "--set", "train.lr=0.01",
              "--num-workers", "0", "--dataset", str(phantoms_2d)]
    from medkd.cli import app

    result = CliRunner().invoke(app, ["distill", *common, "--run-dir", str(tmp_path / "full")])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ckpt["model_spec"]["preset"] == "student" and ckpt["extra_state"]  # adapters saved beside the student
    assert ckpt["config"]["distill"]["recipe"]["name"] == "reco-kd"
    with open(tmp_path / "full" / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"seg", "ms_sard", "ms_ca", "kl"} <= set(rows[0])
    # interrupted after step 4 (checkpoint at 3), then resumed: same weights as the uninterrupted run
    cfg = build_config(ckpt["config"])
    cfg.train.precision = "auto"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", callbacks=[interrupt_at(4)])
    assert CliRunner().invoke(app, ["distill", "--teacher", "x", "--run-dir", str(tmp_path / "cut"), "--resume"]).exit_code == 0
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, value in ckpt["extra_state"].items():
        assert torch.equal(value, resumed["extra_state"][key]), key


def test_distill_loss_decreases(phantoms_2d, tmp_path, tiny_config):
    teacher_cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=20, lr=0.01))
    train(teacher_cfg, tmp_path / "teacher")
    cfg = build_config({**tiny_config(phantoms_2d, tmp_path / "cache", max_steps=30, lr=0.01),
                        "distill": {"teacher": str(tmp_path / "teacher" / "best.pt"),
                                    "recipe": load_recipe("logit-kd").model_dump(mode="json")}})
    train(cfg, tmp_path / "student")
    with open(tmp_path / "student" / "train_log.csv") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_distill_takes_teacher_data_settings_and_flags_win(phantoms_2d, tmp_path, tiny_config):
    train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=1)), tmp_path / "teacher")
    from medkd.cli import app

    args = ["distill", "--teacher", str(tmp_path / "teacher" / "best.pt"), "--max-steps", "1",
            "--patch-size", "32,32", "--set", "train.progress=false", "--run-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(tmp_path / "s" / "last.pt")["config"]
    assert cfg["data"]["dataset"] == str(phantoms_2d)  # from the teacher's run
    assert cfg["data"]["batch_size"] == 4 and cfg["data"]["num_workers"] == 0  # teacher's settings
    assert cfg["data"]["patch_size"] == [32, 32]  # the flag wins
    assert cfg["model"]["preset"] == "student"
