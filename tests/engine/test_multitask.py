"""Multi-task teachers: reconstruction head on a tapped stage, plain segmentation checkpoints."""

from __future__ import annotations

import csv

import pytest
import torch

from medkd.config import build_config
from medkd.engine.trainer import train
from medkd.losses import build_supervised_loss
from medkd.models import create
from medkd.models.taps import TapNotFoundError
from medkd.storage import load_checkpoint
from medkd.teachers.manifest import load_frozen, open_teachers
from medkd.engine.multitask import MultiTaskTask, ReconstructionHead, multitask_task_factory


def _batch(dims: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 1, *([size] * dims))
    return {"image": torch.randn(shape, generator=gen), "label": torch.randint(0, 4, shape, generator=gen)}


@pytest.mark.parametrize("dims,stride", [(2, (16, 16)), (3, (1, 4, 4)), (2, (1, 1))])
def test_head_restores_the_image_size(dims, stride):
    head = ReconstructionHead(12, 2, stride, spatial_dims=dims)
    low = [32 // s for s in stride] if dims == 2 else [8 // stride[0], 16 // stride[1], 16 // stride[2]]
    out = head(torch.randn(1, 12, *low))
    assert out.shape == (1, 2, *([32, 32] if dims == 2 else [8, 16, 16]))


def test_head_rejects_strides_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        ReconstructionHead(8, 1, (3, 3), spatial_dims=2)


def test_task_trains_the_head_and_keeps_the_network_plain():
    network = create("unet", 2, 1, 4, preset="student")
    plain_keys = set(create("unet", 2, 1, 4, preset="student").state_dict())
    task = MultiTaskTask(network, build_supervised_loss("dice_ce"), aux_weight=0.5)
    assert task.tap == "model.1.submodule.1.submodule.1.submodule.1.submodule"  # the bottleneck
    terms = task(_batch())
    assert set(terms) == {"loss", "seg", "recon"}
    assert torch.allclose(terms["loss"], terms["seg"] + terms["recon"])
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.head.parameters())
    assert set(task.network.state_dict()) == plain_keys
    assert set(task.extra_modules().state_dict()) == {f"recon_head.{k}" for k in task.head.state_dict()}


def test_task_options_are_checked():
    network = create("basicunet", 2, 1, 4, preset="student")
    task = MultiTaskTask(network, build_supervised_loss("ce"), aux_weight=0.0, tap="down_2")
    assert task.head.stride == (4, 4) and float(task(_batch())["recon"]) == 0.0
    with pytest.raises(TapNotFoundError, match="down_9"):
        MultiTaskTask(network, build_supervised_loss("ce"), tap="down_9")
    with pytest.raises(ValueError, match="aux_weight"):
        MultiTaskTask(network, build_supervised_loss("ce"), aux_weight=-1.0)


def test_multitask_teacher_trains_and_loads_as_a_plain_teacher(phantoms_2d, tmp_path, tiny_config):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=16, lr=0.01, checkpoint_every=8))
    train(cfg, tmp_path / "run", task_factory=multitask_task_factory(aux_weight=0.5))
    with open(tmp_path / "run" / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    recon = [float(r["recon"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    assert sum(recon[-4:]) < sum(recon[:4]) and sum(loss[-4:]) < sum(loss[:4])
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert not any("recon_head" in k for k in state["state_dict"])
    assert any(k.startswith("recon_head.") for k in state["extra_state"])
    network, _ = load_frozen(tmp_path / "run" / "best.pt")
    assert network(torch.randn(1, 1, 64, 64)).shape == (1, len(state["labels"]), 64, 64)
    assert len(open_teachers(tmp_path / "run" / "best.pt").load_networks()) == 1
    # resuming restores the head too (its weights are in extra_state)
    train(None, tmp_path / "run", resume=True, task_factory=multitask_task_factory(aux_weight=0.5))
