"""Pseudo-label Dice + CE and soft Dice against float64 loop references; masks, special cases, gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medkd.losses.pseudo import SMOOTH, PseudoLabelLoss, SoftDiceLoss


def _reference(student: torch.Tensor, teacher: torch.Tensor, threshold: float) -> float:
    """Explicit loops over voxels (float64)."""
    b, c, *spatial = student.shape
    ce_sum, count = 0.0, 0.0
    overlap, s_sum, t_sum = [0.0] * c, [0.0] * c, [0.0] * c
    for n in range(b):
        for pos in itertools.product(*[range(s) for s in spatial]):
            zt = [float(teacher[(n, k, *pos)]) for k in range(c)]
            pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
            if max(pt) < threshold:
                continue
            y = pt.index(max(pt))
            zs = [float(student[(n, k, *pos)]) for k in range(c)]
            ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
            ce_sum, count = ce_sum - math.log(ps[y]), count + 1
            for k in range(c):
                overlap[k] += ps[k] * (k == y)
                s_sum[k] += ps[k]
                t_sum[k] += float(k == y)
    if count == 0:
        return 0.0
    dice = 1 - sum((2 * overlap[k] + SMOOTH) / (s_sum[k] + t_sum[k] + SMOOTH) for k in range(c)) / c
    return ce_sum / count + dice


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_matches_a_float64_loop(spatial, threshold):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, *spatial, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, *spatial, generator=gen, dtype=torch.float64) * 2
    value = PseudoLabelLoss(threshold=threshold)(student, teacher)
    assert float(value) == pytest.approx(_reference(student, teacher, threshold), rel=1e-9)


def test_special_cases_and_gradients():
    teacher = torch.zeros(1, 3, 4, 4)
    teacher[:, 1] = 40.0  # confident class 1 everywhere
    student = (teacher * 1.0).requires_grad_(True)
    loss = PseudoLabelLoss()
    assert float(loss(student, teacher).detach()) < 1e-6  # the student already says what the teacher says
    assert float(PseudoLabelLoss(threshold=0.9)(student.detach(), torch.zeros(1, 3, 4, 4))) == 0.0  # none confident
    teacher_leaf = teacher.clone().requires_grad_(True)
    wrong = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss(wrong, teacher_leaf).backward()
    assert wrong.grad.abs().sum() > 0 and teacher_leaf.grad is None
    with pytest.raises(ValueError, match="threshold"):
        PseudoLabelLoss(threshold=1.0)


def _soft_dice_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, first: int) -> float:
    b, c, *spatial = student.shape
    overlap, s_sum, t_sum = [0.0] * c, [0.0] * c, [0.0] * c
    for n in range(b):
        for pos in itertools.product(*[range(s) for s in spatial]):
            zs = [float(student[(n, k, *pos)]) / temperature for k in range(c)]
            zt = [float(teacher[(n, k, *pos)]) / temperature for k in range(c)]
            ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
            pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
            for k in range(c):
                overlap[k] += ps[k] * pt[k]
                s_sum[k] += ps[k]
                t_sum[k] += pt[k]
    classes = range(first, c)
    return 1 - sum((2 * overlap[k] + SMOOTH) / (s_sum[k] + t_sum[k] + SMOOTH) for k in classes) / len(classes)


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize(("temperature", "background"), [(1.0, False), (2.0, True)])
def test_soft_dice_matches_a_float64_loop(spatial, temperature, background):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 4, *spatial, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, 4, *spatial, generator=gen, dtype=torch.float64) * 2
    value = SoftDiceLoss(temperature, include_background=background)(student, teacher)
    expected = _soft_dice_reference(student, teacher, temperature, first=0 if background else 1)
    assert float(value) == pytest.approx(expected, rel=1e-9)


def test_soft_dice_special_cases_and_gradients():
    teacher = torch.full((2, 3, 4, 4), -30.0)
    teacher[:, 1, :2], teacher[:, 2, 2:] = 30.0, 30.0  # confident: class 1 above, class 2 below
    assert float(SoftDiceLoss()(teacher.clone(), teacher)) < 1e-6  # the same decision: 0
    # a one-voxel class counts as much as a large one: missing it costs 1 / (number of classes)
    small = teacher.clone()
    small[0, :, 0, 0] = torch.tensor([-30.0, -30.0, 30.0])
    student = small.clone()
    student[0, :, 0, 0] = torch.tensor([-30.0, 30.0, -30.0])
    assert float(SoftDiceLoss()(student, small)) > 0.0
    wrong = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher_leaf = teacher.clone().requires_grad_(True)
    SoftDiceLoss()(wrong, teacher_leaf).backward()
    assert wrong.grad.abs().sum() > 0 and teacher_leaf.grad is None
    with pytest.raises(ValueError, match="temperature"):
        SoftDiceLoss(temperature=0.0)
    with pytest.raises(ValueError, match="2 classes"):
        SoftDiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
