"""Pseudo-label Dice + CE against a float64 loop reference; masks, special cases, gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medkd.losses.pseudo import SMOOTH, PseudoLabelLoss


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
