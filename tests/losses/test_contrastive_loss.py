"""Tests for medkd.losses.contrastive.SupervisedInfoNCELoss (sampling, explicit-loop reference, grads)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from medkd.losses.contrastive import SupervisedInfoNCELoss
from reference_ops import nearest_label, resize_linear, two_scale_features


def _setup(spatial_dims, seed, num_classes=3):
    """Label at full resolution; scale 0: teacher full res, student half res; scale 1: both half res."""
    gen = torch.Generator().manual_seed(seed)
    full = (4, 6) if spatial_dims == 2 else (2, 4, 6)
    half = tuple(max(n // 2, 1) for n in full)
    label = torch.randint(0, num_classes, (2, 1, *full), generator=gen)
    student, teacher = two_scale_features(gen, full, half)
    return student, teacher, label


def _head_ref(head, vec: np.ndarray) -> np.ndarray:
    """conv1x1 -> ReLU -> conv1x1 on one voxel vector, then L2 normalisation."""
    hidden = []
    w1, b1 = head[0].weight.detach().double().numpy(), head[0].bias.detach().double().numpy()
    w2, b2 = head[2].weight.detach().double().numpy(), head[2].bias.detach().double().numpy()
    for o in range(w1.shape[0]):
        hidden.append(max(0.0, b1[o] + sum(w1[o, k].item() * vec[k] for k in range(len(vec)))))
    out = np.array([b2[o] + sum(w2[o, k].item() * hidden[k] for k in range(len(hidden))) for o in range(w2.shape[0])])
    return out / np.linalg.norm(out)


def _reference(loss, student, teacher, label, indices):
    total = 0.0
    for s_idx, (s, t) in enumerate(zip(student, teacher)):
        size = tuple(t.shape[2:])
        voxels = int(np.prod(size))
        anchors, keys, classes = [], [], []
        for flat in indices[s_idx].tolist():
            b, v = divmod(flat, voxels)
            pos = np.unravel_index(v, size)
            s_map = resize_linear(s[b].detach().numpy(), size)
            anchors.append(_head_ref(loss.student_heads[s_idx], s_map[(slice(None), *pos)]))
            keys.append(_head_ref(loss.teacher_heads[s_idx], t[b].detach().numpy()[(slice(None), *pos)]))
            classes.append(nearest_label(label[b, 0].numpy(), size)[pos])
        per_anchor = []
        for i in range(len(anchors)):
            logits = [float(np.dot(anchors[i], k)) / loss.temperature for k in keys]
            log_denominator = math.log(sum(math.exp(x) for x in logits))
            positives = [j for j in range(len(keys)) if classes[j] == classes[i]]
            if positives:
                per_anchor.append(-np.mean([logits[p] - log_denominator for p in positives]))
        total += loss.weights[s_idx] * float(np.mean(per_anchor))
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("samples_per_class", [2, 100])
def test_matches_reference(spatial_dims, samples_per_class):
    torch.manual_seed(spatial_dims)
    loss = SupervisedInfoNCELoss([3, 4], [5, 4], spatial_dims, embed_dim=6, temperature=0.5,
                                 samples_per_class=samples_per_class, weights=[1.0, 0.5], seed=0).double()
    student, teacher, label = _setup(spatial_dims, seed=spatial_dims)
    value = loss(student, teacher, label).item()
    assert len(loss.last_indices) == 2
    assert value == pytest.approx(_reference(loss, student, teacher, label, loss.last_indices), rel=1e-9)


def test_sample_indices_bounded_per_class_and_seeded():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (3, 1, 5, 6, 7), generator=gen)
    label[2] = 1  # one class only in image 2
    loss = SupervisedInfoNCELoss([2], [2], 3, samples_per_class=5, seed=123)
    idx = loss.sample_indices(label)
    flat = label.reshape(-1)
    voxels = label[0].numel()
    counts = Counter((i // voxels, int(flat[i])) for i in idx.tolist())
    for b in range(3):
        for c in range(4):
            assert counts[(b, c)] == min(5, int((label[b] == c).sum()))
    assert torch.equal(idx, torch.unique(idx))  # sorted, without repeats
    again = SupervisedInfoNCELoss([2], [2], 3, samples_per_class=5, seed=123).sample_indices(label)
    assert torch.equal(idx, again)  # the same seed gives the same samples
    assert not torch.equal(idx, loss.sample_indices(label))  # the generator advances between calls
    everything = SupervisedInfoNCELoss([2], [2], 3, samples_per_class=10**6).sample_indices(label[:, 0])
    assert torch.equal(everything, torch.arange(label.numel()))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_normalisation_bound_and_determinism(spatial_dims):
    student, teacher, label = _setup(spatial_dims, seed=7)
    torch.manual_seed(1)
    loss = SupervisedInfoNCELoss([3, 4], [5, 4], spatial_dims, embed_dim=8, samples_per_class=10**6).double()
    value = loss(student, teacher, label).item()
    # every voxel is sampled: duplicating the batch duplicates every key, adding exactly log 2 per scale
    doubled = loss([torch.cat([f, f]) for f in student], [torch.cat([f, f]) for f in teacher], torch.cat([label, label]))
    assert doubled.item() == pytest.approx(value + 2 * math.log(2.0), rel=1e-9)
    # lower bound mean_i log|P(i)| per scale (Jensen)
    bound = 0.0
    for idx, t in zip(loss.last_indices, teacher):
        small = torch.nn.functional.interpolate(label.double(), size=t.shape[2:], mode="nearest").reshape(-1).long()
        counts = torch.bincount(small.repeat(2))
        bound += counts[small.repeat(2)].double().log().mean().item()
    assert doubled.item() >= bound - 1e-9
    torch.manual_seed(2)
    a = SupervisedInfoNCELoss([3, 4], [5, 4], spatial_dims, samples_per_class=3, seed=9).double()
    torch.manual_seed(2)
    b = SupervisedInfoNCELoss([3, 4], [5, 4], spatial_dims, samples_per_class=3, seed=9).double()
    assert a(student, teacher, label).item() == b(student, teacher, label).item()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradients_reach_student_and_heads_not_teacher(spatial_dims):
    student, teacher, label = _setup(spatial_dims, seed=11)
    student = [f.requires_grad_() for f in student]
    teacher = [f.requires_grad_() for f in teacher]
    loss = SupervisedInfoNCELoss([3, 4], [5, 4], spatial_dims, embed_dim=8, samples_per_class=4, seed=0).double()
    loss(student, teacher, label).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad.abs().sum() > 0 for s in student)
    for heads in (loss.student_heads, loss.teacher_heads):
        assert all(head[0].weight.grad.abs().sum() > 0 and head[2].weight.grad.abs().sum() > 0 for head in heads)
    names = {name.split(".")[0] for name, _ in loss.named_parameters()}
    assert names == {"student_heads", "teacher_heads"}  # created in __init__: optimised and checkpointed


def test_input_checks():
    student, teacher, label = _setup(2, seed=1)
    loss = SupervisedInfoNCELoss([3, 4], [5, 4], 2)
    with pytest.raises(ValueError, match="expected 5 channels"):
        loss(student, [teacher[1], teacher[1]], label)
    with pytest.raises(ValueError, match="label batch"):
        loss(student, teacher, label[:1])
    with pytest.raises(ValueError, match="temperature"):
        SupervisedInfoNCELoss([3], [5], 2, temperature=0.0)
    with pytest.raises(ValueError, match="equal length"):
        SupervisedInfoNCELoss([3, 4], [5], 2)


def test_seeded_sampling_state_is_in_the_state_dict():
    """A loss rebuilt from a checkpoint draws on where the saved one stood (not from the seed again)."""
    label = torch.randint(0, 3, (2, 1, 6, 7), generator=torch.Generator().manual_seed(0))
    loss = SupervisedInfoNCELoss([2], [2], 2, samples_per_class=4, seed=11)
    loss.sample_indices(label)
    restored = SupervisedInfoNCELoss([2], [2], 2, samples_per_class=4, seed=11)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.sample_indices(label), loss.sample_indices(label))
    assert "sampler_state" not in SupervisedInfoNCELoss([2], [2], 2).state_dict()  # unseeded: the global RNG
