"""Distillation from a teacher set: cached ensemble targets and live adaptive multi-teacher features."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import build_config
from medkd.storage import load_checkpoint
from medkd.teachers.manifest import load_manifest
from medkd.workflows.teacher_plan import make_plan
from medkd.workflows.train_teachers import train_teacher_set


@pytest.fixture(scope="module")
def subset_set(phantoms_2d, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    tree = tiny_config(phantoms_2d, root / "prep", max_steps=3, val_every=3)
    tree["model"] = {"name": "unet", "preset": "teacher", "shrink": 2}  # wider than the student: adapters
    folder = root / "subset"
    train_teacher_set(folder, make_plan("subset", build_config(tree), subsets=2))
    return folder, root


def _distill(folder, root, recipe, run):
    args = ["distill", "--teacher", str(folder), "--recipe", recipe, "--max-steps", "3", "--num-workers", "0",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.val_every=3",
            "--set", f"data.cache_dir={root / 'prep'}", "--run-dir", str(root / run)]
    return CliRunner().invoke(app, args)


def test_ensemble_kd_from_a_set_uses_the_cached_mean_probabilities(subset_set):
    folder, root = subset_set
    result = _distill(folder, root, "ensemble-kd", "ens")
    assert result.exit_code == 0, result.output
    entries = list((root / "prep" / "teacher_outputs").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    meta = (entries[0] / "meta.json").read_text()
    assert '"mean_prob"' in meta and all(m.name in meta for m in load_manifest(folder).members)
    assert load_checkpoint(root / "ens" / "last.pt")["step"] == 3


def test_adaptive_multi_teacher_has_one_adapter_set_per_member(subset_set):
    folder, root = subset_set
    members = load_manifest(folder).members
    assert all(m.val_dice is not None for m in members)
    result = _distill(folder, root, "adaptive-multi-teacher", "adaptive")
    assert result.exit_code == 0, result.output
    extra = load_checkpoint(root / "adaptive" / "last.pt")["extra_state"]
    per_member = {key.split(".")[1] for key in extra if key.startswith("features.")}
    assert per_member == {str(i) for i in range(len(members))}
    assert all(torch.isfinite(v).all() for v in extra.values() if v.is_floating_point())


@pytest.mark.parametrize("dims", [2, 3])
def test_uncertainty_regression_against_a_float64_loop(dims):
    import numpy as np

    from medkd.losses.logits import UncertaintyRegressionLoss

    torch.manual_seed(0)
    loss = UncertaintyRegressionLoss(num_classes=3, spatial_dims=dims).double()
    shape = (2, 3, 4, 5) if dims == 2 else (2, 3, 2, 3, 4)
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    u = torch.rand((shape[0], 1, *shape[2:]), dtype=torch.float64) * 0.5
    value = loss(z, u)
    w = loss.head.weight.detach().reshape(-1).numpy()
    bias = float(loss.head.bias.detach())
    zn, un, total = z.detach().numpy(), u.numpy(), 0.0
    voxels = list(np.ndindex(zn.shape[0], *zn.shape[2:]))
    for b, *sp in voxels:
        logit = sum(w[c] * zn[(b, c, *sp)] for c in range(3)) + bias
        total += (0.5 / (1 + np.exp(-logit)) - un[(b, 0, *sp)]) ** 2
    assert abs(float(value.detach()) - total / len(voxels)) < 1e-12
    value.backward()
    assert z.grad.abs().sum() > 0 and loss.head.weight.grad.abs().sum() > 0


def test_distiller_regresses_the_ensemble_uncertainty_live():
    from medkd.engine.distill import Distiller
    from medkd.models import create
    from medkd.recipes import recipe_from_dict

    torch.manual_seed(0)
    recipe = recipe_from_dict({"name": "r", "paper": "p", "terms": {
        "soft": {"loss": "prob_mse", "weight": 1.0}, "unc": {"loss": "uncertainty", "weight": 1.0}}})
    assert not recipe.uses_cache and recipe.needs_uncertainty
    teachers = [create("unet", 2, 1, 3, preset="student") for _ in range(2)]
    distiller = Distiller(create("unet", 2, 1, 3, preset="student"), teachers, recipe, spatial_dims=2,
                          in_channels=1, num_classes=3)
    terms = distiller({"image": torch.randn(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32, dtype=torch.long)})
    assert torch.isfinite(terms["unc"]) and terms["unc"] > 0
    terms["loss"].backward()
    assert distiller.terms["unc"][0].head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for t in distiller.teachers for p in t.parameters())
    with pytest.raises(ValueError, match="2\\+ teachers"):
        Distiller(create("unet", 2, 1, 3, preset="student"), teachers[:1], recipe, spatial_dims=2, in_channels=1,
                  num_classes=3)


def _two_temperature_recipe(combine_temperature):
    from medkd.recipes import recipe_from_dict

    teachers = {"combine": "mean_prob"}
    if combine_temperature is not None:
        teachers["combine_temperature"] = combine_temperature
    return recipe_from_dict({"name": "r", "paper": "p", "teachers": teachers, "terms": {
        "kl": {"loss": "kl", "weight": 1.0, "options": {"temperature": 4.0}},
        "dice": {"loss": "soft_dice", "weight": 1.0}}})


def test_combine_temperature_combines_once_and_each_term_softens_the_combined_logits():
    from medkd.engine.distill import Distiller
    from medkd.losses.logits import KLDivergenceLoss
    from medkd.losses.pseudo import SoftDiceLoss
    from medkd.models import create

    torch.manual_seed(0)
    teachers = [create("unet", 2, 1, 3, preset="student") for _ in range(2)]
    student = create("unet", 2, 1, 3, preset="student")
    with pytest.raises(ValueError, match="combine_temperature"):
        Distiller(student, teachers, _two_temperature_recipe(None), spatial_dims=2, in_channels=1,
                  num_classes=3).logit_temperature()
    distiller = Distiller(student, teachers, _two_temperature_recipe(1.0), spatial_dims=2, in_channels=1,
                          num_classes=3).eval()
    assert distiller.logit_temperature() == 1.0
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32, dtype=torch.long)}
    terms = distiller(batch)
    with torch.no_grad():
        mean_prob = torch.stack([torch.softmax(t.eval()(batch["image"]), 1) for t in teachers]).mean(0)
        combined = mean_prob.clamp_min(1e-12).log()  # T_c = 1: the ensemble's own prediction
        s_logits = student(batch["image"])
        expected_kl = KLDivergenceLoss(temperature=4.0)(s_logits, combined)
        expected_dice = SoftDiceLoss()(s_logits, combined)
    assert torch.allclose(terms["kl"], expected_kl, atol=1e-5)
    assert torch.allclose(terms["dice"], expected_dice, atol=1e-5)


def test_balanced_kd_runs_from_a_cached_teacher_set(subset_set):
    folder, root = subset_set
    result = _distill(folder, root, "balanced-kd", "balanced")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(root / "balanced" / "last.pt")["step"] == 3
