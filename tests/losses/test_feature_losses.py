"""Tests for medkd.losses.features against float64 references written with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.losses.features import AttentionTransferLoss, FeatureDistillationLoss, PairwiseSKDLoss
from reference_ops import adapt_conv1x1, resize_linear, upsample2

# ----------------------------------------------------------------------------- reference helpers


def _unit_channels(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for pos in np.ndindex(*x.shape[1:]):
        vec = x[(slice(None), *pos)]
        out[(slice(None), *pos)] = vec / max(np.sqrt((vec**2).sum()), 1e-12)
    return out


def _feats(spatial, channels, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *spatial, generator=gen, dtype=torch.float64)


def _two_scales(spatial_dims, seed, student_half=True):
    """Student (3 ch, then 4 ch) and teacher (5, then 4 ch); scale 0 student at half resolution."""
    big = (4, 6) if spatial_dims == 2 else (2, 4, 6)
    small = tuple(n // 2 for n in big)
    student = [_feats(small if student_half else big, 3, seed), _feats(small, 4, seed + 1)]
    teacher = [_feats(big, 5, seed + 2), _feats(small, 4, seed + 3)]
    return student, teacher


# ----------------------------------------------------------------------------- feature MSE


def _feature_reference(loss, student, teacher):
    total = 0.0
    for s_idx, (s, t) in enumerate(zip(student, teacher)):
        conv = loss.adapters[s_idx] if hasattr(loss.adapters[s_idx], "weight") else None
        values = []
        for b in range(s.shape[0]):
            g = resize_linear(adapt_conv1x1(s[b].detach().numpy(), conv), t.shape[2:])
            tb = t[b].detach().numpy()
            if loss.mode == "normalized_l2":
                g, tb = _unit_channels(g), _unit_channels(tb)
            values.extend(((g - tb) ** 2).ravel().tolist())
        total += loss.weights[s_idx] * float(np.mean(values))
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["mse", "normalized_l2"])
def test_feature_loss_matches_reference(spatial_dims, mode):
    torch.manual_seed(0)
    loss = FeatureDistillationLoss([3, 4], [5, 4], spatial_dims, weights=[1.0, 0.5], mode=mode).double()
    assert isinstance(loss.adapters[1], torch.nn.Identity)
    student, teacher = _two_scales(spatial_dims, seed=10 * spatial_dims)
    value = loss(student, teacher).item()
    assert value == pytest.approx(_feature_reference(loss, student, teacher), rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_feature_loss_invariances_zero_and_grads(spatial_dims):
    torch.manual_seed(1)
    loss = FeatureDistillationLoss([3, 4], [5, 4], spatial_dims).double()
    student, teacher = _two_scales(spatial_dims, seed=3, student_half=False)
    value = loss(student, teacher).item()
    doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher]).item()
    assert doubled == pytest.approx(value, rel=1e-10)
    upsampled = loss([upsample2(f) for f in student], [upsample2(f) for f in teacher]).item()
    assert upsampled == pytest.approx(value, rel=1e-10)
    # zero when the adapted student equals the teacher
    equal_teacher = [loss.adapters[0](student[0]).detach(), student[1].clone()]
    assert loss(student, equal_teacher).item() == pytest.approx(0.0, abs=1e-20)
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad.abs().sum() > 0 for s in student)
    assert loss.adapters[0].weight.grad.abs().sum() > 0
    assert any(p is loss.adapters[0].weight for p in loss.parameters())  # optimised and checkpointed


def test_feature_loss_checks():
    loss = FeatureDistillationLoss([3, 4], [5, 4], 2)
    student, teacher = _two_scales(2, seed=1)
    with pytest.raises(ValueError, match="paired"):
        loss(student[:1], teacher)
    with pytest.raises(ValueError, match="expected 4 channels"):
        loss([student[0], student[0]], teacher)
    with pytest.raises(ValueError, match="mode"):
        FeatureDistillationLoss([3], [5], 2, mode="l1")
    with pytest.raises(ValueError, match="weights"):
        FeatureDistillationLoss([3], [5], 2, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="spatial_dims"):
        FeatureDistillationLoss([3], [5], 4)
    with pytest.raises(ValueError, match="equal length"):
        FeatureDistillationLoss([3, 4], [5], 2)


# ----------------------------------------------------------------------------- attention transfer


def _attention_reference(student, teacher, p, weights, reduction):
    total = 0.0
    for w, s, t in zip(weights, student, teacher):
        per_image = []
        for b in range(s.shape[0]):
            maps = []
            for feat, size in ((s[b].detach().numpy(), t.shape[2:]), (t[b].detach().numpy(), t.shape[2:])):
                att = np.zeros((1, *feat.shape[1:]))
                for pos in np.ndindex(*feat.shape[1:]):
                    att[(0, *pos)] = np.mean([abs(feat[(k, *pos)]) ** p for k in range(feat.shape[0])])
                att = resize_linear(att, size).ravel()
                maps.append(att / np.sqrt((att**2).sum()))
            per_image.append((maps[0] - maps[1]) ** 2)
        sq = np.stack(per_image)
        total += w * (sq.mean() if reduction == "mean" else sq.sum(1).mean())
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("p,reduction", [(2, "mean"), (4, "sum")])
def test_attention_matches_reference(spatial_dims, p, reduction):
    student, teacher = _two_scales(spatial_dims, seed=5 + spatial_dims)
    loss = AttentionTransferLoss(p=p, weights=[0.7, 1.3], reduction=reduction)
    expected = _attention_reference(student, teacher, p, [0.7, 1.3], reduction)
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attention_normalisation_zero_and_grads(spatial_dims):
    student, teacher = _two_scales(spatial_dims, seed=2, student_half=False)
    for reduction, factor in (("mean", 2**spatial_dims), ("sum", 1)):
        loss = AttentionTransferLoss(reduction=reduction)
        value = loss(student, teacher).item()
        doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher]).item()
        assert doubled == pytest.approx(value, rel=1e-10)
        # "mean" averages over N positions of a unit vector: nearest upsampling divides it by 2^d
        upsampled = loss([upsample2(f) for f in student], [upsample2(f) for f in teacher]).item()
        assert upsampled == pytest.approx(value / factor, rel=1e-10)
    loss = AttentionTransferLoss()
    assert loss(teacher, [2.0 * f for f in teacher]).item() == pytest.approx(0.0, abs=1e-20)  # channel/scale-free
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="weights"):
        AttentionTransferLoss(weights=[1.0])(student, teacher)


# ----------------------------------------------------------------------------- pair-wise SKD


def _maxpool_ref(x: np.ndarray, pool: int) -> np.ndarray:
    out_size = [math.ceil(n / pool) for n in x.shape[1:]]
    out = np.zeros((x.shape[0], *out_size))
    for k in range(x.shape[0]):
        for pos in np.ndindex(*out_size):
            window = tuple(slice(i * pool, min((i + 1) * pool, n)) for i, n in zip(pos, x.shape[1:]))
            out[(k, *pos)] = x[(k, *window)].max()
    return out


def _skd_reference(student, teacher, pool, weights):
    total = 0.0
    for w, s, t in zip(weights, student, teacher):
        values = []
        for b in range(s.shape[0]):
            sims = []
            for feat in (resize_linear(s[b].detach().numpy(), t.shape[2:]), t[b].detach().numpy()):
                unit = _unit_channels(_maxpool_ref(feat, pool)).reshape(feat.shape[0], -1)
                n = unit.shape[1]
                sims.append([[float(np.dot(unit[:, i], unit[:, j])) for j in range(n)] for i in range(n)])
            values.extend(((np.array(sims[0]) - np.array(sims[1])) ** 2).ravel().tolist())
        total += w * float(np.mean(values))
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("pool", [1, 2])
def test_skd_matches_reference(spatial_dims, pool):
    student, teacher = _two_scales(spatial_dims, seed=17 + pool)
    loss = PairwiseSKDLoss(pool=pool, weights=[1.0, 0.25])
    expected = _skd_reference(student, teacher, pool, [1.0, 0.25])
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_skd_normalisation_zero_and_grads(spatial_dims):
    student, teacher = _two_scales(spatial_dims, seed=4, student_half=False)
    loss = PairwiseSKDLoss(pool=2)
    value = loss(student, teacher).item()
    assert 0 < value <= 4
    doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher]).item()
    assert doubled == pytest.approx(value, rel=1e-10)
    # the mean over position pairs is unchanged when positions are repeated (pool=1: no pooling)
    flat = PairwiseSKDLoss(pool=1)
    up = flat([upsample2(f) for f in student], [upsample2(f) for f in teacher]).item()
    assert up == pytest.approx(flat(student, teacher).item(), rel=1e-10)
    assert loss(teacher, [3.0 * f for f in teacher]).item() == pytest.approx(0.0, abs=1e-20)
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="pool"):
        PairwiseSKDLoss(pool=0)
