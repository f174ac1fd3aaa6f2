"""Distillation from a teacher set: cached ensemble targets and live adaptive multi-teacher features."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import build_config
from medkd.engine.checkpoint import load_checkpoint
from medkd.teachers.manifest import load_manifest
from medkd.teachers.train import make_plan, train_teacher_set


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
