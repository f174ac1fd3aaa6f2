"""Tests for medkd.teachers.combine: ensemble combination rules, confidence weights, mean-member KL.

References are written independently with explicit numpy loops over members, voxels and classes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.teachers.combine import (
    COMBINATION_RULES,
    MeanMemberKLLoss,
    adaptive_probabilities,
    combine,
    confidence_weights,
    dice_member_weights,
    mean_logits,
    mean_probabilities,
    member_uncertainty,
    voxel_uncertainty,
)

SHAPES = {"2d": (3, 2, 4, 3, 5), "3d": (2, 1, 3, 2, 3, 4)}  # (M, B, C, *spatial)


def _logits(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


# ---- numpy references (loops) ---------------------------------------------------------------


def _np_softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _voxels(shape):
    """Iterate (b, *spatial) index tuples of a (B, C, *spatial) shape."""
    return np.ndindex(shape[0], *shape[2:])


def _member_vec(z, m, b, sp):
    return [float(z[(m, b, c) + sp]) for c in range(z.shape[2])]


def _norm_w(w, m):
    w = [1.0] * m if w is None else [float(x) for x in w]
    s = sum(w)
    return [x / s for x in w]


def ref_mean_prob(z, t=1.0, w=None):
    z = z.numpy()
    m_, b_, c_ = z.shape[:3]
    w = _norm_w(w, m_)
    out = np.zeros(z.shape[1:])
    for b, *sp in _voxels(z.shape[1:]):
        sp = tuple(sp)
        for m in range(m_):
            p = _np_softmax([x / t for x in _member_vec(z, m, b, sp)])
            for c in range(c_):
                out[(b, c) + sp] += w[m] * p[c]
    return out


def ref_mean_logits(z, t=1.0, w=None):
    z = z.numpy()
    m_, b_, c_ = z.shape[:3]
    w = _norm_w(w, m_)
    out = np.zeros(z.shape[1:])
    for b, *sp in _voxels(z.shape[1:]):
        sp = tuple(sp)
        avg = [sum(w[m] * z[(m, b, c) + sp] for m in range(m_)) for c in range(c_)]
        p = _np_softmax([x / t for x in avg])
        for c in range(c_):
            out[(b, c) + sp] = p[c]
    return out


def ref_confidence_weights(z, tw=1.0, w=None):
    z = z.numpy()
    m_ = z.shape[0]
    w = _norm_w(w, m_)
    out = np.zeros((m_, z.shape[1], 1) + z.shape[3:])
    for b, *sp in _voxels(z.shape[1:]):
        sp = tuple(sp)
        unnorm = []
        for m in range(m_):
            p = _np_softmax(_member_vec(z, m, b, sp))
            conf = sum(pc * math.log(pc) for pc in p)  # negative entropy
            unnorm.append(w[m] * math.exp(conf / tw))
        s = sum(unnorm)
        for m in range(m_):
            out[(m, b, 0) + sp] = unnorm[m] / s
    return out


def ref_adaptive(z, t=1.0, tw=1.0, w=None):
    a = ref_confidence_weights(z, tw, w)
    zn = z.numpy()
    m_, _, c_ = zn.shape[:3]
    out = np.zeros(zn.shape[1:])
    for b, *sp in _voxels(zn.shape[1:]):
        sp = tuple(sp)
        for m in range(m_):
            p = _np_softmax([x / t for x in _member_vec(zn, m, b, sp)])
            for c in range(c_):
                out[(b, c) + sp] += a[(m, b, 0) + sp] * p[c]
    return out


def _kl(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))


def ref_mean_member_kl(zs, zm, t):
    zs, zm = zs.numpy(), zm.numpy()
    m_ = zm.shape[0]
    total, n = 0.0, 0
    for b, *sp in _voxels(zs.shape):
        sp = tuple(sp)
        q = _np_softmax([x / t for x in [zs[(b, c) + sp] for c in range(zs.shape[1])]])
        per = [_kl(_np_softmax([x / t for x in _member_vec(zm, m, b, sp)]), q) for m in range(m_)]
        total += sum(per) / m_
        n += 1
    return t * t * total / n


# ---- combination rules -----------------------------------------------------------------------


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("t", [1.0, 2.5])
@pytest.mark.parametrize("w", [None, [0.5, 2.0, 1.5]])
def test_mean_rules_match_reference(dims, t, w):
    z = _logits(SHAPES[dims], seed=1)
    if w is not None:
        w = w[: z.shape[0]]
    np.testing.assert_allclose(mean_probabilities(z, t, w).numpy(), ref_mean_prob(z, t, w), atol=1e-12)
    np.testing.assert_allclose(mean_logits(z, t, w).numpy(), ref_mean_logits(z, t, w), atol=1e-12)
    np.testing.assert_allclose(combine("mean_prob", z, temperature=t, member_weights=w).numpy(),
                               ref_mean_prob(z, t, w), atol=1e-12)
    np.testing.assert_allclose(combine("mean_logits", z, temperature=t, member_weights=w).numpy(),
                               ref_mean_logits(z, t, w), atol=1e-12)


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("t,tw,w", [(1.0, 1.0, None), (3.0, 0.5, [0.2, 0.9, 0.4])])
def test_adaptive_matches_reference(dims, t, tw, w):
    z = _logits(SHAPES[dims], seed=2)
    if w is not None:
        w = w[: z.shape[0]]
    a = confidence_weights(z, temperature_w=tw, member_weights=w)
    assert a.shape == (z.shape[0], z.shape[1], 1) + z.shape[3:]
    np.testing.assert_allclose(a.numpy(), ref_confidence_weights(z, tw, w), atol=1e-12)
    expected = ref_adaptive(z, t, tw, w)
    np.testing.assert_allclose(adaptive_probabilities(z, t, tw, w).numpy(), expected, atol=1e-12)
    got = combine("adaptive", z, temperature=t, temperature_w=tw, member_weights=w)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("rule", COMBINATION_RULES)
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_outputs_are_distributions(rule, dims):
    z = _logits(SHAPES[dims], seed=3, scale=5.0)
    p = combine(rule, z, temperature=2.0)
    assert p.shape == z.shape[1:]
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones_like(p[:, 0]))


def test_mean_prob_differs_from_mean_logits():
    # Two members agree on class 0 with different confidence: logit gaps 4 and 0.
    z = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64).reshape(2, 1, 2, 1, 1)
    p_prob = mean_probabilities(z)[0, :, 0, 0]
    p_logit = mean_logits(z)[0, :, 0, 0]
    assert p_prob[0].item() == pytest.approx((1 / (1 + math.exp(-4)) + 0.5) / 2)  # ~0.741
    assert p_logit[0].item() == pytest.approx(1 / (1 + math.exp(-2)))  # ~0.881
    assert p_logit[0] > p_prob[0] + 0.1  # logit averaging is sharper here
    # Identical members: both rules give the member's own distribution.
    same = _logits((1, 2, 3, 2, 2), seed=4).expand(3, -1, -1, -1, -1)
    torch.testing.assert_close(mean_probabilities(same), mean_logits(same))
    torch.testing.assert_close(mean_probabilities(same), torch.softmax(same[0], 1))


def test_uncertainty():
    z = _logits(SHAPES["3d"], seed=5)
    probs = torch.softmax(z, dim=2)
    u = member_uncertainty(probs)
    zn = probs.numpy()
    ref = np.zeros(zn.shape[1:])
    for idx in np.ndindex(*zn.shape[1:]):
        vals = [zn[(m,) + idx] for m in range(zn.shape[0])]
        mu = sum(vals) / len(vals)
        ref[idx] = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
    np.testing.assert_allclose(u.numpy(), ref, atol=1e-12)
    v = voxel_uncertainty(probs)
    assert v.shape == (z.shape[1], 1) + z.shape[3:]
    np.testing.assert_allclose(v.numpy(), ref.mean(axis=1, keepdims=True), atol=1e-12)
    same = probs[:1].expand(4, *probs.shape[1:])
    assert voxel_uncertainty(same).abs().max() == 0


# ---- confidence weights ----------------------------------------------------------------------


def test_confidence_weights_sum_to_one_and_favour_confident_member():
    z = _logits((2, 2, 3, 4, 4), seed=6, scale=1.0)
    z[0] = z[0] * 8.0  # member 0 is peaked almost everywhere
    a = confidence_weights(z)
    torch.testing.assert_close(a.sum(0), torch.ones_like(a[0]))
    p = torch.softmax(z, 2)
    neg_entropy = (p * p.log()).sum(2, keepdim=True)
    more_confident = neg_entropy[0] > neg_entropy[1]
    assert more_confident.float().mean() > 0.5
    assert (a[0][more_confident] > a[1][more_confident]).all()
    assert (a[0][~more_confident] <= a[1][~more_confident]).all()
    # Harder choice at low T_w: confident member's weight grows where it is more confident.
    a_hard = confidence_weights(z, temperature_w=0.1)
    assert (a_hard[0][more_confident] >= a[0][more_confident]).all()


def test_confidence_weights_identical_members():
    z = _logits((1, 2, 3, 3, 3), seed=7).expand(3, -1, -1, -1, -1)
    a = confidence_weights(z)
    torch.testing.assert_close(a, torch.full_like(a, 1 / 3))
    a = confidence_weights(z, member_weights=[1.0, 2.0, 0.0])
    expected = torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64).reshape(3, 1, 1, 1, 1).expand_as(a)
    torch.testing.assert_close(a, expected)


def test_dice_member_weights():
    w = dice_member_weights([0.8, 0.6, 0.0], power=2.0, dtype=torch.float64)
    torch.testing.assert_close(w, torch.tensor([0.64, 0.36, 0.0], dtype=torch.float64))
    w1 = dice_member_weights([0.5, 0.25])
    assert w1.dtype == torch.get_default_dtype() and torch.allclose(w1, torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(dice_member_weights([0.9, 0.1], power=0.0), torch.tensor([0.5, 0.5]))
    for bad in ([0.0, 0.0], [1.2, 0.5], [-0.1, 0.5], []):
        with pytest.raises(ValueError):
            dice_member_weights(bad)
    with pytest.raises(ValueError, match="power"):
        dice_member_weights([0.5], power=-1.0)


# ---- MeanMemberKLLoss ------------------------------------------------------------------------


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_mean_member_kl_reference_and_identity(dims):
    zm = _logits(SHAPES[dims], seed=8)
    zs = _logits(SHAPES[dims][1:], seed=9)
    t = 2.0
    loss = MeanMemberKLLoss(temperature=t)
    value = loss(zs, zm)
    assert value.item() == pytest.approx(ref_mean_member_kl(zs, zm, t), rel=1e-10)
    # Identity: mean_m KL(p_m || q) = KL(pbar || q) + mean_m KL(p_m || pbar), per voxel.
    pm = torch.softmax(zm / t, 2)
    pbar = pm.mean(0)
    log_q = torch.log_softmax(zs / t, 1)
    kl_bar_q = (pbar * (pbar.log() - log_q)).sum(1).mean()
    js = (pm * (pm.log() - pbar.log().unsqueeze(0))).sum(2).mean(0).mean()
    assert value.item() == pytest.approx(t * t * (kl_bar_q + js).item(), rel=1e-10)
    assert js > 0  # so the loss differs from T^2 KL(pbar || q) whenever members disagree


def test_mean_member_kl_zero_when_members_equal_student():
    zs = _logits((2, 3, 4, 4), seed=10)
    assert MeanMemberKLLoss()(zs, zs.unsqueeze(0).expand(3, -1, -1, -1, -1)).abs().item() < 1e-12


def test_mean_member_kl_gradient_reaches_student_only():
    zs = _logits((1, 3, 4, 4), seed=11).requires_grad_(True)
    zm = _logits((2, 1, 3, 4, 4), seed=12).requires_grad_(True)
    MeanMemberKLLoss()(zs, zm).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zm.grad is None


def test_mean_member_kl_invariances():
    zm = _logits((2, 1, 3, 3, 3), seed=13)
    zs = _logits((1, 3, 3, 3), seed=14)
    loss = MeanMemberKLLoss(temperature=3.0)
    base = loss(zs, zm)
    dup = loss(torch.cat([zs, zs]), torch.cat([zm, zm], dim=1))
    assert dup.item() == pytest.approx(base.item(), rel=1e-12)
    up_s = zs.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    up_m = zm.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    assert loss(up_s, up_m).item() == pytest.approx(base.item(), rel=1e-12)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [mean_probabilities, mean_logits, confidence_weights, adaptive_probabilities])
def test_combination_errors(fn):
    z = _logits((2, 1, 3, 2, 2), seed=15)
    with pytest.raises(ValueError, match="stacked"):
        fn(z[0])  # (B, C, H, W) without the member axis
    with pytest.raises(ValueError, match="non-negative"):
        fn(z, member_weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="one weight per member"):
        fn(z, member_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="all be zero"):
        fn(z, member_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        fn(z, 0.0)


def test_other_errors():
    z = _logits((2, 1, 3, 2, 2), seed=16)
    with pytest.raises(ValueError, match="valid rules: mean_prob, mean_logits, adaptive"):
        combine("median", z)
    with pytest.raises(ValueError, match="stacked"):
        member_uncertainty(torch.rand(2, 3, 4))
    loss = MeanMemberKLLoss()
    with pytest.raises(ValueError, match="student"):
        loss(_logits((1, 3, 2, 3), seed=17), z)  # spatial mismatch
    with pytest.raises(ValueError, match="student"):
        loss(_logits((1, 4, 2, 2), seed=17), z)  # class mismatch
    with pytest.raises(ValueError, match="stacked"):
        loss(z[0], z[0])
    with pytest.raises(ValueError, match="temperature"):
        MeanMemberKLLoss(temperature=-1.0)
