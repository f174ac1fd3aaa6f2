"""Tests for medkd.losses.logits against float64 references written with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.losses.logits import ChannelWiseDistillationLoss, KLDivergenceLoss, ProbabilityMSELoss

SPATIAL = [(3, 4), (2, 3, 4)]


def _logits(spatial, seed, batch=2, classes=3, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * scale
    t = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * scale
    return s, t


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _upsample(x: torch.Tensor) -> torch.Tensor:
    for axis in range(2, x.ndim):
        x = x.repeat_interleave(2, dim=axis)
    return x


# ----------------------------------------------------------------------------- references


def _kl_reference(s, t, temperature, mask=None, teacher_probs=False):
    s, t = s.detach().numpy(), t.detach().numpy()
    total, weight_sum = 0.0, 0.0
    for b in range(s.shape[0]):
        for pos in np.ndindex(*s.shape[2:]):
            p_s = _softmax([s[(b, c, *pos)] for c in range(s.shape[1])], temperature)
            if teacher_probs:
                powered = [t[(b, c, *pos)] ** (1.0 / temperature) for c in range(s.shape[1])]
                p_t = [v / sum(powered) for v in powered]
            else:
                p_t = _softmax([t[(b, c, *pos)] for c in range(s.shape[1])], temperature)
            kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s) if pt > 0)
            w = 1.0 if mask is None else float(mask[(b, 0, *pos)])
            total += w * kl
            weight_sum += w
    return temperature**2 * total / weight_sum


def _prob_mse_reference(s, t, temperature):
    s, t = s.detach().numpy(), t.detach().numpy()
    values = []
    for b in range(s.shape[0]):
        for pos in np.ndindex(*s.shape[2:]):
            p_s = _softmax([s[(b, c, *pos)] for c in range(s.shape[1])], temperature)
            p_t = _softmax([t[(b, c, *pos)] for c in range(s.shape[1])], temperature)
            values.append(sum((a - b_) ** 2 for a, b_ in zip(p_s, p_t)))
    return float(np.mean(values))


def _cwd_reference(s, t, temperature):
    s, t = s.detach().numpy(), t.detach().numpy()
    batch, channels = s.shape[:2]
    total = 0.0
    for b in range(batch):
        for c in range(channels):
            positions = list(np.ndindex(*s.shape[2:]))
            phi_s = _softmax([s[(b, c, *pos)] for pos in positions], temperature)
            phi_t = _softmax([t[(b, c, *pos)] for pos in positions], temperature)
            total += sum(pt * math.log(pt / ps) for pt, ps in zip(phi_t, phi_s))
    return temperature**2 * total / channels / batch


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_matches_reference(spatial, temperature):
    s, t = _logits(spatial, seed=len(spatial) + int(temperature))
    loss = KLDivergenceLoss(temperature)(s, t)
    assert loss.item() == pytest.approx(_kl_reference(s, t, temperature), rel=1e-10)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_kl_mask_matches_reference(spatial):
    s, t = _logits(spatial, seed=7)
    mask = (torch.rand(2, 1, *spatial, generator=torch.Generator().manual_seed(1)) > 0.4).double()
    loss = KLDivergenceLoss(2.0)(s, t, mask=mask)
    assert loss.item() == pytest.approx(_kl_reference(s, t, 2.0, mask=mask.numpy()), rel=1e-10)
    # a (B, *spatial) bool mask gives the same value
    assert KLDivergenceLoss(2.0)(s, t, mask=mask[:, 0].bool()).item() == pytest.approx(loss.item(), rel=1e-12)
    empty = KLDivergenceLoss(2.0)(s.requires_grad_(), t, mask=torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def _class_balanced_kl_reference(s, t, temperature, mask=None):
    """Mean over the teacher's argmax classes present of each class's (mask-weighted) mean KL."""
    s, t = s.detach().numpy(), t.detach().numpy()
    per_class: dict[int, list[float]] = {}
    for b in range(s.shape[0]):
        for pos in np.ndindex(*s.shape[2:]):
            z_t = [t[(b, c, *pos)] for c in range(s.shape[1])]
            p_s = _softmax([s[(b, c, *pos)] for c in range(s.shape[1])], temperature)
            p_t = _softmax(z_t, temperature)
            kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
            w = 1.0 if mask is None else float(mask[(b, 0, *pos)])
            sums = per_class.setdefault(int(np.argmax(z_t)), [0.0, 0.0])
            sums[0], sums[1] = sums[0] + w * kl, sums[1] + w
    means = [total / weight for total, weight in per_class.values() if weight > 0]
    return temperature**2 * sum(means) / len(means)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_class_balanced_kl_matches_reference(spatial):
    s, t = _logits(spatial, seed=5, classes=4)
    t[:, 3] -= 6.0  # class 3 wins only a few voxels: the case the option is for
    loss = KLDivergenceLoss(4.0, class_balanced=True)
    assert loss(s, t).item() == pytest.approx(_class_balanced_kl_reference(s, t, 4.0), rel=1e-10)
    mask = (torch.rand(2, 1, *spatial, generator=torch.Generator().manual_seed(3)) > 0.3).double()
    assert loss(s, t, mask=mask).item() == pytest.approx(
        _class_balanced_kl_reference(s, t, 4.0, mask=mask.numpy()), rel=1e-10)
    # one class everywhere: the same as the plain voxel mean
    single = t.clone()
    single[:, 0] += 50.0
    assert loss(s, single).item() == pytest.approx(KLDivergenceLoss(4.0)(s, single).item(), rel=1e-10)
    assert loss(t, t).item() == pytest.approx(0.0, abs=1e-12)
    student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize("spatial", SPATIAL)
def test_kl_teacher_probabilities(spatial):
    s, t = _logits(spatial, seed=11)
    probs = torch.softmax(t, dim=1)
    for temperature in (1.0, 3.0):
        from_probs = KLDivergenceLoss(temperature, teacher_is_probs=True)(s, probs)
        # p^(1/T) renormalised equals softmax(z / T) when p = softmax(z)
        assert from_probs.item() == pytest.approx(KLDivergenceLoss(temperature)(s, t).item(), rel=1e-9)
    probs = probs.clone()
    origin = (0,) * len(spatial)
    probs[(0, 0, *origin)] = 0.0  # a zero teacher probability is allowed
    probs[(0, slice(None), *origin)] /= probs[(0, slice(None), *origin)].sum()
    loss = KLDivergenceLoss(2.0, teacher_is_probs=True)(s, probs)
    assert loss.item() == pytest.approx(_kl_reference(s, probs, 2.0, teacher_probs=True), rel=1e-9)


@pytest.mark.parametrize("cls", [KLDivergenceLoss, ProbabilityMSELoss])
@pytest.mark.parametrize("spatial", SPATIAL)
def test_per_voxel_normalisation_and_zero(cls, spatial):
    s, t = _logits(spatial, seed=3)
    loss = cls(temperature=2.0)
    value = loss(s, t).item()
    assert value > 0
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(value, rel=1e-10)
    assert loss(_upsample(s), _upsample(t)).item() == pytest.approx(value, rel=1e-10)
    assert loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cls", [KLDivergenceLoss, ProbabilityMSELoss, ChannelWiseDistillationLoss])
def test_teacher_not_differentiated(cls):
    s, t = _logits((3, 4), seed=5)
    s.requires_grad_()
    t.requires_grad_()
    cls()(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kl_input_checks():
    s, t = _logits((3, 4), seed=1)
    with pytest.raises(ValueError, match="shapes differ"):
        KLDivergenceLoss()(s, t[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        KLDivergenceLoss()(s, t * float("nan"))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        KLDivergenceLoss()(s[0], t[0])
    with pytest.raises(ValueError, match="temperature"):
        KLDivergenceLoss(temperature=0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        KLDivergenceLoss(teacher_is_probs=True)(s, t)
    with pytest.raises(ValueError, match="mask shape"):
        KLDivergenceLoss()(s, t, mask=torch.ones(2, 1, 3, 5))


# ----------------------------------------------------------------------------- probability MSE


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_prob_mse_matches_reference(spatial, temperature):
    s, t = _logits(spatial, seed=20 + len(spatial))
    loss = ProbabilityMSELoss(temperature)(s, t)
    assert loss.item() == pytest.approx(_prob_mse_reference(s, t, temperature), rel=1e-10)
    from_probs = ProbabilityMSELoss(temperature, teacher_probs=True)(s, torch.softmax(t, dim=1))
    assert from_probs.item() == pytest.approx(loss.item(), rel=1e-9)
    assert ProbabilityMSELoss(temperature, teacher_is_probs=True).teacher_is_probs


# ----------------------------------------------------------------------------- CWD


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_matches_reference(spatial, temperature):
    s, t = _logits(spatial, seed=30 + len(spatial))
    loss = ChannelWiseDistillationLoss(temperature)(s, t)
    assert loss.item() == pytest.approx(_cwd_reference(s, t, temperature), rel=1e-10)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_cwd_invariances_and_zero(spatial):
    s, t = _logits(spatial, seed=41)
    loss = ChannelWiseDistillationLoss(2.0)
    value = loss(s, t).item()
    assert value > 0
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(value, rel=1e-10)
    # a KL between spatial distributions is unchanged when every position is repeated
    assert loss(_upsample(s), _upsample(t)).item() == pytest.approx(value, rel=1e-10)
    assert loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(s, s + 1.5).item() == pytest.approx(0.0, abs=1e-12)  # per-channel shift invariance


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cwd_adapter(spatial_dims):
    spatial = (3, 4) if spatial_dims == 2 else (2, 3, 4)
    loss = ChannelWiseDistillationLoss(2.0, student_channels=2, teacher_channels=5, spatial_dims=spatial_dims)
    assert isinstance(loss.adapter, torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d)
    s = torch.randn(2, 2, *spatial, requires_grad=True)
    t = torch.randn(2, 5, *spatial, requires_grad=True)
    loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert loss.adapter.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="channels for the adapter"):
        loss(torch.randn(2, 3, *spatial), t)
    same = ChannelWiseDistillationLoss(student_channels=3, teacher_channels=3)
    assert isinstance(same.adapter, torch.nn.Identity)


# ----------------------------------------------------------------------------- registry


def test_distill_registry():
    from medkd.losses.distill_registry import DISTILL_INPUTS, DISTILL_LOSSES, build_distill_loss, describe

    expected = {"kl", "prob_mse", "cwd", "feature", "attention", "skd", "ms_sard", "ms_ca", "region_affinity",
                "contrastive", "uncertainty", "pseudo_label", "soft_dice"}
    assert set(DISTILL_LOSSES) == expected
    assert all(cls.inputs in DISTILL_INPUTS for cls in DISTILL_LOSSES.values())
    assert DISTILL_LOSSES["uncertainty"].inputs == "logits+uncertainty"
    assert DISTILL_LOSSES["kl"].inputs == "logits" and DISTILL_LOSSES["skd"].inputs == "features"
    assert DISTILL_LOSSES["ms_sard"].inputs == "features+label"
    kl = build_distill_loss("kl", temperature=2.0)
    assert isinstance(kl, KLDivergenceLoss) and kl.temperature == 2.0
    feature = build_distill_loss("feature", student_channels=[2], teacher_channels=[4], spatial_dims=3)
    assert sum(p.numel() for p in feature.parameters()) == 2 * 4 + 4
    assert describe("kl").startswith("Temperature-scaled KL divergence")
    assert all(describe(name) and "\n" not in describe(name) for name in DISTILL_LOSSES)
    with pytest.raises(ValueError, match="valid names: .*'kl'"):
        build_distill_loss("nope")
    with pytest.raises(ValueError, match="valid names"):
        describe("nope")
