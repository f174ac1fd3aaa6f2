"""Shared fixtures: small synthetic datasets made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medkd.data.phantoms import make_phantoms

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantoms_2d(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("ph2d") / "Dataset001_P2D", spatial_dims=2,
                         num_train=10, num_test=2, shape=(64, 64), seed=1)


@pytest.fixture(scope="session")
def phantoms_3d(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("ph3d") / "Dataset002_P3D", spatial_dims=3,
                         num_train=6, num_test=2, shape=(16, 48, 48), seed=2)


@pytest.fixture(scope="session")
def tiny_config():
    """Factory of run configs small enough for a unit test."""
    return _tiny_config


def _tiny_config(dataset: Path, cache: Path, **train) -> dict:
    """A run config small enough for a unit test: student UNet, 2D 64x64 patches, no workers."""
    return {
        "data": {"dataset": str(dataset), "mode": "2d", "patch_size": [64, 64], "batch_size": 4,
                 "num_workers": 0, "cache_dir": str(cache)},
        "model": {"name": "unet", "preset": "student"},
        "train": {"max_steps": 6, "val_every": 1000, "checkpoint_every": 3, "log_every": 1,
                  "progress": False, "tensorboard": False, "seed": 3, **train},
    }


@pytest.fixture(scope="session")
def tiny_teachers():
    """``tiny_teachers(dataset, root, cache, seeds, shrink, batch_size=None)``: one 2-step UNet teacher
    (teacher preset at width ``shrink``) per seed, trained into ``root/t<seed>``; their run folders."""
    return _tiny_teachers


def _tiny_teachers(dataset: Path, root: Path, cache: Path, seeds, shrink: int, batch_size: int | None = None):
    from medkd.config import build_config
    from medkd.engine.trainer import train

    runs = []
    for seed in seeds:
        tree = _tiny_config(dataset, cache, max_steps=2, seed=seed)
        if batch_size is not None:
            tree["data"]["batch_size"] = batch_size
        tree["model"] = {"name": "unet", "preset": "teacher", "shrink": shrink}
        train(build_config(tree), root / f"t{seed}")
        runs.append(root / f"t{seed}")
    return runs


class InterruptAt:
    """A trainer callback that simulates a killed run: raises right after step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, terms):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")
def interrupt_at():
    """The :class:`InterruptAt` callback class (``callbacks=[interrupt_at(4)]``)."""
    return InterruptAt


@pytest.fixture(scope="session")
def rotated_copies():
    """``rotated_copies(source, target)``: the images of ``source`` with a rotated direction and a moved
    origin (3D) written to ``target``, which is returned."""
    return _rotated_copies


def _rotated_copies(source: Path, target: Path) -> Path:
    import SimpleITK as sitk

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        image = sitk.ReadImage(str(path))
        image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
        image.SetOrigin((-12.5, 40.0, 3.25))
        sitk.WriteImage(image, str(target / path.name))
    return target

