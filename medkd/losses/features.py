"""Intermediate-feature distillation losses: multi-scale feature MSE, attention transfer, pair-wise SKD.

Convention: ``forward(student_feats, teacher_feats)`` with sequences (one entry per tap/scale, a
single tensor is accepted as one scale) of ``(B, K, *spatial)`` tensors, 2D or 3D. Student and
teacher taps may differ in channels (adapters or channel-free formulas) and in grid size (the
student is resized to the teacher's grid, bilinear/trilinear, ``align_corners=False``). The
teacher side is always detached. Per-scale terms are combined as ``sum_s w_s * loss_s`` with
``w_s = 1`` by default (a plain sum, not a mean, over scales).

The helpers here (adapters, resizing, weights, label grids) are shared by the region and
contrastive losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AttentionTransferLoss", "FeatureDistillationLoss", "PairwiseSKDLoss"]


# ----------------------------------------------------------------------------- helpers


def as_feature_list(feats: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """A tensor or a sequence of tensors -> list of 4D/5D tensors without NaN (``ValueError`` otherwise)."""
    feats = [feats] if isinstance(feats, torch.Tensor) else list(feats)
    if not feats:
        raise ValueError(f"{name} features are empty; pass one (B, K, *spatial) tensor per scale.")
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.ndim not in (4, 5):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{name} feature {i} must be a (B, K, H, W) or (B, K, D, H, W) tensor, got {shape}.")
        if torch.isnan(f).any():
            raise ValueError(f"{name} feature {i} contains NaN.")
    return feats


def check_feature_pairs(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate paired multi-scale features (same number of scales, batch size and ndim per scale)."""
    student, teacher = as_feature_list(student, "student"), as_feature_list(teacher, "teacher")
    if len(student) != len(teacher):
        raise ValueError(f"got {len(student)} student and {len(teacher)} teacher scales; they must be paired.")
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.ndim != t.ndim or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"scale {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in ndim or batch size."
            )
    return student, teacher


def resolve_weights(weights: Sequence[float] | None, num_scales: int) -> list[float]:
    """Per-scale weights: ``[1.0] * num_scales`` by default; user weights must match and be >= 0."""
    if weights is None:
        return [1.0] * num_scales
    weights = [float(w) for w in weights]
    if len(weights) != num_scales or any(w < 0 for w in weights):
        raise ValueError(f"weights must be {num_scales} non-negative numbers (one per scale), got {weights}.")
    return weights


def check_channel_lists(
    student_channels: Sequence[int], teacher_channels: Sequence[int], spatial_dims: int
) -> tuple[list[int], list[int]]:
    """Validate constructor channel lists (non-empty, equal length, positive) and ``spatial_dims``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    student, teacher = [int(c) for c in student_channels], [int(c) for c in teacher_channels]
    if not student or len(student) != len(teacher) or min(student + teacher) < 1:
        raise ValueError(f"student_channels {student} and teacher_channels {teacher} must be "
                         "non-empty, of equal length and positive.")
    return student, teacher


def build_adapters(
    student_channels: Sequence[int], teacher_channels: Sequence[int], spatial_dims: int
) -> nn.ModuleList:
    """One 1x1 conv (``Conv2d``/``Conv3d``) per scale where channels differ, ``nn.Identity`` otherwise."""
    student_channels, teacher_channels = check_channel_lists(student_channels, teacher_channels, spatial_dims)
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.ModuleList(
        nn.Identity() if cs == ct else conv(cs, ct, kernel_size=1)
        for cs, ct in zip(student_channels, teacher_channels, strict=True)
    )


def check_channels(feats: Sequence[torch.Tensor], channels: Sequence[int], spatial_dims: int, name: str) -> None:
    """Raise ``ValueError`` unless ``feats[i]`` is ``(B, channels[i], *spatial)`` with ``spatial_dims`` axes."""
    if len(feats) != len(channels):
        raise ValueError(f"expected {len(channels)} {name} scales (from the constructor), got {len(feats)}.")
    for i, (f, c) in enumerate(zip(feats, channels, strict=True)):
        if f.ndim != spatial_dims + 2 or f.shape[1] != c:
            raise ValueError(f"{name} feature {i} has shape {tuple(f.shape)}; expected {c} channels and "
                             f"{spatial_dims} spatial axes.")


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(B, K, *spatial)`` to ``size`` (bilinear/trilinear, ``align_corners=False``) if it differs."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def prepare_label(label: torch.Tensor, spatial_dims: int, num_classes: int | None = None) -> torch.Tensor:
    """Integer label ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> ``long (B, 1, *spatial)`` in ``[0, num_classes)``."""
    if label.ndim == spatial_dims + 1:
        label = label.unsqueeze(1)
    if label.ndim != spatial_dims + 2 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, *spatial) or (B, *spatial) with {spatial_dims} spatial axes, "
                         f"got {tuple(label.shape)}.")
    if label.is_floating_point() and not torch.equal(label, label.round()):
        raise ValueError("label must hold integer class labels; got non-integral values.")
    label = label.long()
    if (label < 0).any() or (num_classes is not None and (label >= num_classes).any()):
        high = "inf" if num_classes is None else num_classes
        raise ValueError(f"label values must lie in [0, {high}), got range [{int(label.min())}, {int(label.max())}].")
    return label


def label_to_grid(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resample of a ``long (B, 1, *spatial)`` label to ``size`` (PyTorch ``"nearest"``:
    source index ``floor(i * in / out)``)."""
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(size), mode="nearest").long()


# ----------------------------------------------------------------------------- losses


class FeatureDistillationLoss(nn.Module):
    r"""Multi-scale feature-map distillation (FitNets-style hint loss with 1x1 adapters).

    Per scale ``s``: ``g_s = resize(adapter_s(F_s^s))`` to the teacher's grid and

    * ``mode="mse"``: ``l_s = mean((g_s - F_t^s)^2)`` over ``(B, K, *spatial)``;
    * ``mode="normalized_l2"``: both ``g_s`` and ``F_t^s`` are first L2-normalised along channels
      per voxel (so ``l_s`` lies in ``[0, 4 / K]``).

    ``loss = sum_s w_s * l_s`` (``w_s = 1`` by default). Adapters (1x1 conv where channels differ,
    identity otherwise) are created here, so they are trained and checkpointed with the loss.

    Args:
        student_channels, teacher_channels: channels per scale.
        spatial_dims: 2 or 3.
        weights: per-scale weights.
        mode: ``"mse"`` or ``"normalized_l2"``.
    """

    inputs = "features"

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        spatial_dims: int,
        weights: Sequence[float] | None = None,
        mode: str = "mse",
    ) -> None:
        super().__init__()
        if mode not in ("mse", "normalized_l2"):
            raise ValueError(f"mode must be 'mse' or 'normalized_l2', got {mode!r}.")
        self.adapters = build_adapters(student_channels, teacher_channels, spatial_dims)
        self.student_channels, self.teacher_channels = list(student_channels), list(teacher_channels)
        self.spatial_dims, self.mode = spatial_dims, mode
        self.weights = resolve_weights(weights, len(self.adapters))

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        check_channels(student, self.student_channels, self.spatial_dims, "student")
        check_channels(teacher, self.teacher_channels, self.spatial_dims, "teacher")
        total = student[0].new_zeros(())
        for adapter, w, s, t in zip(self.adapters, self.weights, student, teacher, strict=True):
            g, t = resize_to(adapter(s), t.shape[2:]), t.detach()
            if self.mode == "normalized_l2":
                g, t = F.normalize(g, dim=1), F.normalize(t, dim=1)
            total = total + w * (g - t).pow(2).mean()
        return total


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_k |F_k|^p`` as ``(B, 1, *spatial)`` (not yet flattened or normalised)."""
    return feat.abs().pow(p).mean(dim=1, keepdim=True)


class AttentionTransferLoss(nn.Module):
    r"""Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    ``a(F) = normalize(flatten(mean_k |F_k|^p))`` per image (L2 norm over positions); the student
    map ``mean_k |F_s,k|^p`` is resized to the teacher's grid before flattening. Per scale
    ``l_s = mean((a(F_s) - a(F_t))^2)`` over ``(B, N)`` (``reduction="mean"``, as in the paper's
    code) and ``loss = sum_s w_s * l_s``. Channel-free: no adapters.

    Normalisation: invariant to the batch size, but with ``"mean"`` the value scales as ``1/N``
    (nearest upsampling by 2 per axis divides it by ``2^d``). ``reduction="sum"`` sums over
    positions (mean over the batch): the squared distance of unit vectors, in ``[0, 4]`` and
    invariant to nearest upsampling.

    Args:
        p: exponent (2 in the paper, 4 in EMKD).
        weights: per-scale weights (checked against the number of scales at call time).
        reduction: ``"mean"`` or ``"sum"``.
    """

    inputs = "features"

    def __init__(self, p: float = 2, weights: Sequence[float] | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.p, self.weights, self.reduction = float(p), weights, reduction

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        total = student[0].new_zeros(())
        for w, s, t in zip(resolve_weights(self.weights, len(student)), student, teacher, strict=True):
            a_s = resize_to(attention_map(s, self.p), t.shape[2:]).flatten(1)
            a_t = attention_map(t.detach(), self.p).flatten(1)
            diff = (F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)).pow(2)
            total = total + w * (diff.mean() if self.reduction == "mean" else diff.sum(1).mean())
        return total


def pairwise_similarity(feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between positions: ``(B, K, *spatial)`` -> ``(B, N, N)``."""
    flat = F.normalize(feat.flatten(2), dim=1)
    return flat.transpose(1, 2) @ flat


class PairwiseSKDLoss(nn.Module):
    r"""Pair-wise structured knowledge distillation (Liu et al., CVPR 2019).

    Per scale: the student is resized to the teacher's grid, both are max-pooled with kernel and
    stride ``pool`` (``ceil_mode=True``), L2-normalised along channels, and
    ``S = F^T F`` (``N x N`` cosine similarities between positions); ``l_s = mean((S_s - S_t)^2)``
    and ``loss = sum_s w_s * l_s``. Channel-free: no adapters.

    Normalisation: each entry lies in ``[-1, 1]`` so ``l_s`` is in ``[0, 4]``; invariant to the
    batch size and to repeating positions of the pooled grid (e.g. nearest upsampling with
    ``pool=1``). Memory is ``O(B N^2)``: pool coarse enough in 3D.

    Args:
        pool: max-pool kernel/stride (1 disables pooling).
        weights: per-scale weights (checked against the number of scales at call time).
    """

    inputs = "features"

    def __init__(self, pool: int = 2, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if int(pool) < 1:
            raise ValueError(f"pool must be a positive integer, got {pool}.")
        self.pool, self.weights = int(pool), weights

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == 1:
            return x
        fn = F.max_pool2d if x.ndim == 4 else F.max_pool3d
        return fn(x, kernel_size=self.pool, stride=self.pool, ceil_mode=True)

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        total = student[0].new_zeros(())
        for w, s, t in zip(resolve_weights(self.weights, len(student)), student, teacher, strict=True):
            s_sim = pairwise_similarity(self._pool(resize_to(s, t.shape[2:])))
            t_sim = pairwise_similarity(self._pool(t.detach()))
            total = total + w * (s_sim - t_sim).pow(2).mean()
        return total
