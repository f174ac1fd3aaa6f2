"""Tests for medkd.losses.regions (MS-SARD, MS-CA, region affinity) against explicit-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.losses.regions import MSCALoss, MSSARDLoss, RegionAffinityLoss
from reference_ops import adapt_conv1x1, nearest_label, resize_linear, two_scale_features, upsample2

EPS = 1e-6

# ----------------------------------------------------------------------------- reference helpers


def _area_fraction_ref(label: np.ndarray, c: int, size) -> np.ndarray:
    """Fraction of class ``c`` in each adaptive-average-pool cell."""
    out = np.zeros(size)
    for pos in np.ndindex(*size):
        window = tuple(
            slice(int(math.floor(i * n_in / n_out)), int(math.ceil((i + 1) * n_in / n_out)))
            for i, n_in, n_out in zip(pos, label.shape, size)
        )
        out[pos] = np.mean(label[window] == c)
    return out


def _avg_pool_ref(x: np.ndarray, size) -> np.ndarray:
    out = np.zeros((x.shape[0], *size))
    for k in range(x.shape[0]):
        for pos in np.ndindex(*size):
            window = tuple(
                slice(int(math.floor(i * n_in / n_out)), int(math.ceil((i + 1) * n_in / n_out)))
                for i, n_in, n_out in zip(pos, x.shape[1:], size)
            )
            out[(k, *pos)] = x[(k, *window)].mean()
    return out


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / max(np.linalg.norm(u), 1e-12) / max(np.linalg.norm(v), 1e-12))


def _setup(spatial_dims, seed, num_classes=4, blocky=False):
    """Label at full resolution; scale 0 teacher at full res (student at half res), scale 1 at half res."""
    gen = torch.Generator().manual_seed(seed)
    full = (4, 8) if spatial_dims == 2 else (2, 4, 8)
    half = tuple(max(n // 2, 1) for n in full)
    if blocky:  # label constant on 2-voxel blocks, so nearest downsampling does not depend on the phase
        coarse = torch.randint(0, num_classes, (2, 1, *half), generator=gen)
        label = coarse
        for axis in range(2, label.ndim):
            label = label.repeat_interleave(2, dim=axis)
    else:
        label = torch.randint(0, num_classes - 1, (2, 1, *full), generator=gen)  # last class absent
    student, teacher = two_scale_features(gen, full, half)
    return student, teacher, label


# ----------------------------------------------------------------------------- MS-SARD


def _sard_reference(loss, student, teacher, label):
    total = 0.0
    first = 0 if loss.include_background else 1
    for s_idx, (s, t) in enumerate(zip(student, teacher)):
        size = tuple(t.shape[2:])
        num = np.zeros(loss.num_classes)
        den = np.zeros(loss.num_classes)
        act_in = np.zeros(loss.num_classes)
        per_voxel = []  # (b, pos, error, activation)
        for b in range(s.shape[0]):
            g = resize_linear(adapt_conv1x1(s[b].detach().numpy(), loss.adapters[s_idx]), size)
            tb = t[b].detach().numpy()
            lab = label[b, 0].numpy()
            if loss.mask_mode == "nearest":
                small = nearest_label(lab, size)
                masks = [(small == c).astype(float) for c in range(loss.num_classes)]
            else:
                masks = [_area_fraction_ref(lab, c, size) for c in range(loss.num_classes)]
            for pos in np.ndindex(*size):
                err = np.mean([(tb[(k, *pos)] - g[(k, *pos)]) ** 2 for k in range(tb.shape[0])])
                act = np.mean([abs(tb[(k, *pos)]) for k in range(tb.shape[0])])
                per_voxel.append((err, act, [m[pos] for m in masks]))
        for c in range(loss.num_classes):
            den[c] = sum(m[c] for _, _, m in per_voxel)
            act_in[c] = sum(m[c] * a for _, a, m in per_voxel) / (den[c] + EPS)
            if loss.activation_weighting:
                num[c] = sum(m[c] * e * a / (act_in[c] + EPS) for e, a, m in per_voxel)
            else:
                num[c] = sum(m[c] * e for e, _, m in per_voxel)
        present = [c for c in range(first, loss.num_classes) if den[c] > 0]
        total += loss.weights[s_idx] * np.mean([num[c] / (den[c] + EPS) for c in present])
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "mask_mode,activation,background", [("nearest", False, True), ("area", True, False), ("nearest", True, False)]
)
def test_ms_sard_matches_reference(spatial_dims, mask_mode, activation, background):
    torch.manual_seed(spatial_dims)
    loss = MSSARDLoss([3, 4], [5, 4], spatial_dims, num_classes=4, weights=[1.0, 0.5], mask_mode=mask_mode,
                      activation_weighting=activation, include_background=background, eps=EPS).double()
    student, teacher, label = _setup(spatial_dims, seed=spatial_dims + 10 * activation)
    expected = _sard_reference(loss, student, teacher, label)
    assert loss(student, teacher, label).item() == pytest.approx(expected, rel=1e-9)
    assert loss(student, teacher, label[:, 0]).item() == pytest.approx(expected, rel=1e-9)  # (B, *spatial)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mask_mode", ["nearest", "area"])
def test_ms_sard_invariances_zero_and_grads(spatial_dims, mask_mode):
    torch.manual_seed(0)
    loss = MSSARDLoss([3, 4], [5, 4], spatial_dims, num_classes=4, mask_mode=mask_mode).double()
    student, teacher, label = _setup(spatial_dims, seed=5, blocky=True)
    student = [upsample2(student[0]), student[1]]  # same grid as the teacher: exact upsampling invariance
    value = loss(student, teacher, label).item()
    doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher], torch.cat([label, label]))
    assert doubled.item() == pytest.approx(value, rel=1e-6)  # eps aside, sums double on both sides
    up = loss([upsample2(f) for f in student], [upsample2(f) for f in teacher], upsample2(label))
    assert up.item() == pytest.approx(value, rel=1e-6)
    equal = [loss.adapters[0](student[0]).detach(), student[1].clone()]
    assert loss(student, equal, label).item() == pytest.approx(0.0, abs=1e-20)
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher, label).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)
    assert loss.adapters[0].weight.grad.abs().sum() > 0


def test_ms_sard_small_region_counts_like_large_and_checks():
    loss = MSSARDLoss([2], [2], 2, num_classes=2, eps=EPS)
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    label[0, 0, 0, 0] = 1  # one foreground voxel, error 1 there; background error 0
    teacher = torch.zeros(1, 2, 4, 4)
    student = torch.zeros(1, 2, 4, 4)
    student[0, :, 0, 0] = 1.0
    assert loss([student], [teacher], label).item() == pytest.approx(0.5, rel=1e-5)  # mean(E_bg=0, E_fg=1)
    no_bg = MSSARDLoss([2], [2], 2, num_classes=2, include_background=False)
    assert no_bg([student], [teacher], torch.zeros_like(label)).item() == 0.0  # no class present
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 2\)"):
        loss([student], [teacher], label + 1)
    with pytest.raises(ValueError, match="mask_mode"):
        MSSARDLoss([2], [2], 2, num_classes=2, mask_mode="bilinear")
    with pytest.raises(ValueError, match="label must be"):
        loss([student], [teacher], label[0, 0, 0])


# ----------------------------------------------------------------------------- MS-CA


def _msca_reference(student, teacher, pool, weights):
    total = 0.0
    for w, s, t in zip(weights, student, teacher):
        grid = tuple(min(pool, n) for n in t.shape[2:])
        values = []
        for b in range(s.shape[0]):
            mats = []
            for feat in (s[b].detach().numpy(), t[b].detach().numpy()):
                flat = _avg_pool_ref(feat, grid).reshape(feat.shape[0], -1)
                n = flat.shape[1]
                mats.append(np.array([[_cos(flat[:, i], flat[:, j]) for j in range(n)] for i in range(n)]))
            values.extend(((mats[0] - mats[1]) ** 2).ravel().tolist())
        total += w * float(np.mean(values))
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("pool", [2, 3])
def test_ms_ca_matches_reference(spatial_dims, pool):
    student, teacher, _ = _setup(spatial_dims, seed=20 + pool)
    loss = MSCALoss(weights=[0.5, 2.0], pool_size=pool)
    expected = _msca_reference(student, teacher, pool, [0.5, 2.0])
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ms_ca_invariances_zero_and_grads(spatial_dims):
    student, teacher, _ = _setup(spatial_dims, seed=3)
    loss = MSCALoss(pool_size=[1] * (spatial_dims - 2) + [2, 2])
    value = loss(student, teacher).item()
    assert 0 < value <= 4
    assert loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher]).item() == pytest.approx(
        value, rel=1e-10)
    up = loss([upsample2(f) for f in student], [upsample2(f) for f in teacher]).item()
    assert up == pytest.approx(value, rel=1e-10)  # pooled to a fixed grid that divides the input
    assert loss(teacher, [2.0 * f for f in teacher]).item() == pytest.approx(0.0, abs=1e-20)
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="pool_size"):
        MSCALoss(pool_size=[2, 2, 2, 2])(student, teacher)
    with pytest.raises(ValueError, match="pool_size"):
        MSCALoss(pool_size=0)


# ----------------------------------------------------------------------------- region affinity


def _affinity_reference(student, teacher, label, num_classes, weights):
    total = 0.0
    for w, s, t in zip(weights, student, teacher):
        per_image = []
        for b in range(s.shape[0]):
            means, presents = [], []
            for feat in (s[b].detach().numpy(), t[b].detach().numpy()):
                small = nearest_label(label[b, 0].numpy(), feat.shape[1:])
                r, present = {}, set()
                for c in range(num_classes):
                    vecs = [feat[(slice(None), *pos)] for pos in np.ndindex(*small.shape) if small[pos] == c]
                    if vecs:
                        r[c] = np.mean(vecs, axis=0)
                        present.add(c)
                means.append(r)
                presents.append(present)
            both = sorted(presents[0] & presents[1])
            pairs = [(i, j) for i in both for j in both if i < j]
            if pairs:
                per_image.append(np.mean([
                    (_cos(means[0][i], means[0][j]) - _cos(means[1][i], means[1][j])) ** 2 for i, j in pairs]))
        total += w * (float(np.mean(per_image)) if per_image else 0.0)
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_region_affinity_matches_reference(spatial_dims):
    student, teacher, label = _setup(spatial_dims, seed=40 + spatial_dims, num_classes=5)
    label[1] = label[1].clamp(max=0)  # image 1: a single class, skipped
    label[1, 0, 0, 0] = 2  # ...unless a second class shows up at full resolution only
    loss = RegionAffinityLoss(num_classes=5, weights=[1.0, 0.5])
    expected = _affinity_reference(student, teacher, label, 5, [1.0, 0.5])
    assert loss(student, teacher, label).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_region_affinity_invariances_zero_and_grads(spatial_dims):
    student, teacher, label = _setup(spatial_dims, seed=8, num_classes=4, blocky=True)
    loss = RegionAffinityLoss(num_classes=4)
    value = loss(student, teacher, label).item()
    assert value > 0
    doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher], torch.cat([label, label]))
    assert doubled.item() == pytest.approx(value, rel=1e-10)
    up = loss([upsample2(f) for f in student], [upsample2(f) for f in teacher], upsample2(label))
    assert up.item() == pytest.approx(value, rel=1e-10)
    assert loss([2.0 * f for f in teacher], teacher, label).item() == pytest.approx(0.0, abs=1e-20)
    assert loss(student, teacher, torch.zeros_like(label)).item() == 0.0  # one class only: nothing to compare
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss(student, teacher, label).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="num_classes"):
        RegionAffinityLoss(num_classes=1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ms_sard_normalize_equals_raw_loss_on_unit_features_times_channels(spatial_dims):
    gen = torch.Generator().manual_seed(7)
    full = (6, 8) if spatial_dims == 2 else (4, 6, 8)
    label = torch.randint(0, 3, (2, 1, *full), generator=gen)
    student = [torch.randn(2, 5, *full, generator=gen, dtype=torch.float64)]
    teacher = [torch.randn(2, 5, *full, generator=gen, dtype=torch.float64)]
    normalized = MSSARDLoss([5], [5], spatial_dims, num_classes=3, normalize=True).double()
    raw = MSSARDLoss([5], [5], spatial_dims, num_classes=3).double()
    unit = [torch.nn.functional.normalize(f, dim=1) for f in (student[0], teacher[0])]
    expected = 5 * raw([unit[0]], [unit[1]], label)
    torch.testing.assert_close(normalized(student, teacher, label), expected)
    assert float(normalized(teacher, teacher, label)) == 0.0
    assert 0.0 <= float(normalized(student, teacher, label)) <= 4.0
