"""Tests for medkd.models.complexity against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medkd.models import count_macs, count_parameters, create
from medkd.models.complexity import measure_latency, torch_threads


class _Net2d(nn.Module):
    """conv2d -> convtranspose2d -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)  # (B, 8, 8, 8)
        self.grouped = nn.Conv2d(8, 8, kernel_size=(1, 3), padding=(0, 1), groups=4)  # (B, 8, 8, 8)
        self.up = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)  # (B, 4, 16, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        x = self.up(self.act(self.grouped(self.conv(x))))
        return self.fc(x.flatten(1))


def test_count_macs_2d_by_hand():
    b = 2
    conv = (b * 8 * 8 * 8) * 3 * 9
    grouped = (b * 8 * 8 * 8) * (8 // 4) * 3
    up = (b * 8 * 8 * 8) * 4 * 4  # in_numel * out_ch * prod(k)
    fc = 1024 * (b * 10)
    assert count_macs(_Net2d(), (b, 3, 8, 8)) == conv + grouped + up + fc


def test_count_macs_3d_and_1d_sequential():
    model = nn.Sequential(
        nn.Conv3d(2, 4, kernel_size=3, stride=2, padding=1),  # (1, 4, 2, 4, 4)
        nn.ConvTranspose3d(4, 2, kernel_size=(1, 2, 2), stride=(1, 2, 2)),  # (1, 2, 2, 8, 8)
        nn.BatchNorm3d(2),
    )
    expected = (4 * 2 * 4 * 4) * 2 * 27 + (4 * 2 * 4 * 4) * 2 * 4
    assert count_macs(model, (1, 2, 4, 8, 8)) == expected
    conv1d = nn.Conv1d(1, 6, kernel_size=5)
    assert count_macs(conv1d, (3, 1, 20)) == 3 * 6 * 16 * 5


def test_count_macs_restores_state_and_removes_hooks():
    model = _Net2d().train()
    model.fc.eval()  # a mixed state must survive
    count_macs(model, (1, 3, 8, 8))
    assert model.training and model.conv.training and not model.fc.training
    assert all(not m._forward_hooks for m in model.modules())


def test_count_macs_scales_with_batch_and_student_is_cheaper():
    teacher = create("unet", 2, 1, 2)
    student = create("unet", 2, 1, 2, preset="student")
    one = count_macs(student, (1, 1, 32, 32))
    assert count_macs(student, (2, 1, 32, 32)) == 2 * one
    assert count_macs(teacher, (1, 1, 32, 32)) > 10 * one


def test_count_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 * 2 + 2
    assert count_parameters(model) == 23


def test_measure_latency_restores_threads_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).train()
    before = torch.get_num_threads()
    stats = measure_latency(model, (1, 1, 16, 16), warmup=1, repeats=5, threads=1)
    assert torch.get_num_threads() == before
    assert model.training
    assert stats["threads"] == 1 and stats["repeats"] == 5
    assert 0 < stats["min_ms"] <= stats["median_ms"]
    assert stats["min_ms"] <= stats["mean_ms"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(nn.Conv2d(1, 1, 1), (1,))
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(nn.Identity(), (1, 1, 4, 4), repeats=0)


def test_torch_threads_sets_the_count_inside_and_restores_it_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
