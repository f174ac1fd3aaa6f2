"""Trained runs and their bundles, made once per test session (tiny students, a few steps on phantoms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medkd.config import build_config
from medkd.data.dataset import load_dataset
from medkd.data.preprocess import make_plan
from medkd.engine.trainer import train
from medkd.models import create
from medkd.storage import save_checkpoint
from medkd.workflows.export import export_bundle


def checkpoint_of(model, dataset_root: Path, path: Path, mode: str, patch: list[int],
                  target_spacing: list[float] | None = None, **extra) -> Path:
    """A checkpoint of ``model`` (untrained is fine) with a real preprocessing plan of the dataset."""
    dataset = load_dataset(dataset_root)
    plan = make_plan(dataset, dataset.training[:2], mode=mode, target_spacing=target_spacing)
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                     "preprocessing": {"plan": plan.to_dict(), "patch_size": patch},
                     "labels": dict(dataset.labels), "step": 0, **extra}, path)
    return path


def tiny_checkpoint(name: str, dataset_root: Path, path: Path, mode: str, **kwargs) -> Path:
    """An untrained student checkpoint; seeded, so the weights (and the float error of narrow, barely active
    channels that instance norm amplifies) do not depend on which tests ran before."""
    dataset = load_dataset(dataset_root)
    torch.manual_seed(0)
    model = create(name, 2 if mode == "2d" else 3, dataset.num_channels, dataset.num_classes, preset="student")
    return checkpoint_of(model, dataset_root, path, mode, [32, 32] if mode == "2d" else [16, 32, 32], **kwargs)


@pytest.fixture(scope="session")
def make_checkpoint():
    """:func:`checkpoint_of`: a checkpoint of a given model with a real plan of a dataset."""
    return checkpoint_of


@pytest.fixture(scope="session")
def untrained_checkpoint():
    """:func:`tiny_checkpoint`: a checkpoint of an untrained registry student."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def run_2d(phantoms_2d, tmp_path_factory, tiny_config) -> Path:
    """A 2D run trained for a few steps, with its post-processing decision (native 2D PNG phantoms)."""
    root = tmp_path_factory.mktemp("run2d")
    train(build_config(tiny_config(phantoms_2d, root / "cache", max_steps=30)), root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def run_3d(phantoms_3d, tmp_path_factory, tiny_config) -> Path:
    """A 3D run (resampled to another spacing) trained for a few steps on NIfTI phantoms."""
    root = tmp_path_factory.mktemp("run3d")
    config = tiny_config(phantoms_3d, root / "cache", max_steps=6)
    config["data"].update(mode="3d", patch_size=[16, 32, 32], batch_size=2, target_spacing=[2.0, 1.2, 1.2])
    config["model"]["name"] = "dynunet"
    config["model"]["deep_supervision"] = True
    train(build_config(config), root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def bundle_2d(run_2d, tmp_path_factory) -> Path:
    return export_bundle(run_2d, tmp_path_factory.mktemp("b2d") / "bundle", latency_repeats=1).bundle


@pytest.fixture(scope="session")
def bundle_3d(run_3d, tmp_path_factory) -> Path:
    return export_bundle(run_3d, tmp_path_factory.mktemp("b3d") / "bundle", latency_repeats=1).bundle
