"""Tests for medkd.losses.supervised (Lovász against an independent reference, MONAI wrappers, DS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    DiceLovaszLoss,
    LovaszSoftmaxLoss,
    build_supervised_loss,
)

# ----------------------------------------------------------------------------- reference


def _jaccard_loss_of_mistakes(mistakes: set, gt: set) -> float:
    """Delta_J(M) = |M| / |gt ∪ M| (0 for an empty union)."""
    union = gt | mistakes
    return len(mistakes) / len(union) if union else 0.0


def _lovasz_class_reference(probs: np.ndarray, labels: np.ndarray, c: int) -> float:
    """sum_i e_sorted[i] * (J(first i+1 mistakes) - J(first i mistakes)) with explicit sets."""
    fg = (labels == c).astype(np.float64)
    errors = np.abs(fg - probs[c])
    order = [int(i) for i in np.argsort(-errors, kind="stable")]
    gt = {i for i in range(labels.size) if labels[i] == c}
    total, previous, mistakes = 0.0, 0.0, set()
    for i in order:
        mistakes.add(i)
        current = _jaccard_loss_of_mistakes(mistakes, gt)
        total += errors[i] * (current - previous)
        previous = current
    return total


def _lovasz_flat_reference(probs: np.ndarray, labels: np.ndarray, classes: str) -> float:
    num_classes = probs.shape[0]
    chosen = [c for c in range(num_classes) if classes == "all" or np.any(labels == c)]
    if not chosen:
        return 0.0
    return float(np.mean([_lovasz_class_reference(probs, labels, c) for c in chosen]))


def _lovasz_reference(logits: torch.Tensor, target: torch.Tensor, per_image: bool, classes: str) -> float:
    x = logits.detach().double().numpy()
    x = np.exp(x - x.max(axis=1, keepdims=True))
    probs = x / x.sum(axis=1, keepdims=True)
    b, c = probs.shape[:2]
    probs = probs.reshape(b, c, -1)
    labels = target.numpy().reshape(b, -1)
    if per_image:
        return float(np.mean([_lovasz_flat_reference(probs[i], labels[i], classes) for i in range(b)]))
    return _lovasz_flat_reference(probs.transpose(1, 0, 2).reshape(c, -1), labels.reshape(-1), classes)


# ----------------------------------------------------------------------------- Lovász


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_matches_reference(spatial, per_image, classes):
    gen = torch.Generator().manual_seed(len(spatial) * 4 + 2 * per_image + (classes == "all"))
    num_classes = 4
    logits = torch.randn(2, num_classes, *spatial, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 3, (2, 1, *spatial), generator=gen)  # class 3 absent: present != all
    target[1][target[1] == 2] = 0  # image 1 lacks class 2 too
    loss = LovaszSoftmaxLoss(per_image=per_image, classes=classes)(logits, target)
    expected = _lovasz_reference(logits, target, per_image, classes)
    assert loss.item() == pytest.approx(expected, abs=1e-10)


def test_present_and_all_differ_when_class_absent():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6, 6)
    target = torch.randint(0, 2, (1, 6, 6))
    present = LovaszSoftmaxLoss(classes="present")(logits, target)
    all_ = LovaszSoftmaxLoss(classes="all")(logits, target)
    assert not torch.isclose(present, all_)


def test_lovasz_zero_for_perfect_confident_logits():
    target = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 3, 1, 2).float() * 50.0
    for per_image in (False, True):
        assert LovaszSoftmaxLoss(per_image=per_image)(logits, target).item() < 1e-6
    wrong = LovaszSoftmaxLoss()(-logits, target)
    assert wrong.item() > 0.9


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_invariant_to_voxel_repeat_and_batch_duplication(per_image):
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 4, 4))
    loss = LovaszSoftmaxLoss(per_image=per_image)
    base = loss(logits, target)
    up = lambda t: t.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # noqa: E731
    assert loss(up(logits), up(target)).item() == pytest.approx(base.item(), abs=1e-10)
    dup = loss(torch.cat([logits, logits]), torch.cat([target, target]))
    assert dup.item() == pytest.approx(base.item(), abs=1e-10)


def test_lovasz_gradient_and_ignore_index():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6))
    LovaszSoftmaxLoss()(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # ignored voxels: same as dropping them; their logits get no gradient
    target_ign = target.clone()
    target_ign[:, :3] = 255
    logits.grad = None
    loss = LovaszSoftmaxLoss(ignore_index=255)(logits, target_ign)
    loss.backward()
    assert logits.grad[:, :, :3].abs().sum() == 0
    ref = _lovasz_reference(logits[:, :, 3:], target[:, 3:], per_image=False, classes="present")
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    # everything ignored -> 0 with a graph
    logits.grad = None
    zero = LovaszSoftmaxLoss(ignore_index=255)(logits, torch.full_like(target, 255))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None


# ----------------------------------------------------------------------------- validation


def test_input_validation_messages():
    loss = LovaszSoftmaxLoss()
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="label 7"):
        loss(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(ValueError, match="label -1"):
        CrossEntropyLoss()(logits, torch.full((1, 1, 4, 4), -1))
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.full((1, 3, 4, 4), float("nan")), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="incompatible"):
        loss(logits, torch.zeros(1, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        loss(torch.randn(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        DiceCELoss()(logits, torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="classes"):
        LovaszSoftmaxLoss(classes="some")


# ----------------------------------------------------------------------------- MONAI wrappers


@pytest.mark.parametrize("name", ["dice_ce", "dice_lovasz", "ce", "dice", "lovasz"])
@pytest.mark.parametrize("spatial", [(8, 8), (4, 8, 8)])
def test_factory_losses_2d_3d(name, spatial):
    torch.manual_seed(4)
    logits = torch.randn(2, 3, *spatial, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, *spatial))
    loss_fn = build_supervised_loss(name)
    loss = loss_fn(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss_fn(logits, target[:, 0]).item() == pytest.approx(loss.item(), rel=1e-6)  # (B, *spatial) target
    # per-voxel normalised: duplicating the batch leaves the value unchanged
    dup = loss_fn(torch.cat([logits, logits]), torch.cat([target, target]))
    assert dup.item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_wrappers_match_direct_formulas():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 1, 6, 6))
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(ce.item(), rel=1e-6)
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((2, 3))
    dice = 1 - (2 * inter + 1e-5) / (probs.sum((2, 3)) + onehot.sum((2, 3)) + 1e-5)
    assert DiceLoss()(logits, target).item() == pytest.approx(dice.mean().item(), rel=1e-5)
    assert DiceCELoss()(logits, target).item() == pytest.approx(dice.mean().item() + ce.item(), rel=1e-5)
    combo = DiceLovaszLoss(dice_weight=0.5, lovasz_weight=2.0)(logits, target)
    expected = 0.5 * dice.mean() + 2.0 * LovaszSoftmaxLoss()(logits, target)
    assert combo.item() == pytest.approx(expected.item(), rel=1e-5)


def test_build_unknown_name():
    with pytest.raises(ValueError, match="dice_ce"):
        build_supervised_loss("focal")


def test_build_passes_options():
    loss = build_supervised_loss("lovasz", per_image=True, classes="all")
    assert loss.per_image and loss.classes == "all"


# ----------------------------------------------------------------------------- deep supervision


@pytest.mark.parametrize("spatial", [(8, 8), (4, 8, 8)])
def test_deep_supervision_weighting(spatial):
    torch.manual_seed(6)
    heads = torch.randn(2, 3, 4, *spatial)  # (B, K=3, C=4, *spatial)
    target = torch.randint(0, 4, (2, 1, *spatial))
    base = CrossEntropyLoss()
    per_head = [base(heads[:, k], target).item() for k in range(3)]
    expected = (4 * per_head[0] + 2 * per_head[1] + per_head[2]) / 7
    ds = DeepSupervisionLoss(base)
    assert ds.head_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert ds(heads, target).item() == pytest.approx(expected, rel=1e-6)
    assert ds(heads, target[:, 0]).item() == pytest.approx(expected, rel=1e-6)
    custom = DeepSupervisionLoss(base, weights=[1, 1, 0])
    assert custom(heads, target).item() == pytest.approx((per_head[0] + per_head[1]) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="heads"):
        DeepSupervisionLoss(base, weights=[1, 1])(heads, target)


def test_deep_supervision_plain_logits_pass_through():
    torch.manual_seed(7)
    base = DiceCELoss()
    ds = DeepSupervisionLoss(base)
    logits3d = torch.randn(2, 3, 4, 8, 8)
    target3d = torch.randint(0, 3, (2, 4, 8, 8))  # (B, *spatial): must NOT be taken as heads
    assert ds(logits3d, target3d).item() == pytest.approx(base(logits3d, target3d).item())
    thin, thin_target = logits3d[:, :, :1], target3d[:, :1]  # depth 1: (B, 1, H, W) is still (B, *spatial)
    assert ds(thin, thin_target).item() == pytest.approx(base(thin, thin_target).item())
    logits2d = torch.randn(2, 3, 8, 8)
    target2d = torch.randint(0, 3, (2, 1, 8, 8))
    assert ds(logits2d, target2d).item() == pytest.approx(base(logits2d, target2d).item())
