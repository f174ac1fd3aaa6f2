"""Region- and context-aware distillation: ReCo-KD MS-SARD and MS-CA, EMKD region affinity.

Conventions as in :mod:`medkd.losses.features`: multi-scale ``(B, K, *spatial)`` feature
sequences (teacher detached), per-scale weights ``w_s`` (default 1, summed). Label inputs are
integer maps ``(B, 1, *spatial)`` or ``(B, *spatial)``, usually at the image resolution, and are
brought to each feature grid here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses.features import (
    build_adapters,
    check_channels,
    check_feature_pairs,
    label_to_grid,
    pairwise_similarity,
    prepare_label,
    resize_to,
    resolve_weights,
)

__all__ = ["MSCALoss", "MSSARDLoss", "RegionAffinityLoss"]


def one_hot_masks(label: torch.Tensor, num_classes: int, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Class masks ``(B, C, *size)`` from a ``long (B, 1, *spatial)`` label.

    ``"nearest"``: the label is resampled nearest-neighbour, then one-hot encoded (binary masks);
    ``"area"``: the full-resolution one-hot is area-averaged (adaptive average pooling) to
    ``size``, giving the fraction of each feature cell covered by each class.
    """
    if mode == "nearest":
        small = label_to_grid(label, size)[:, 0]
        return F.one_hot(small, num_classes).movedim(-1, 1).float()
    full = F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float()
    pool = F.adaptive_avg_pool2d if label.ndim == 4 else F.adaptive_avg_pool3d
    return pool(full, tuple(size))


class MSSARDLoss(nn.Module):
    r"""ReCo-KD multi-scale structure-aware region distillation (MS-SARD).

    Per scale ``s`` (student adapted by a 1x1 conv and resized to the teacher grid) and class
    ``c``, with ``M_c^s`` the one-hot label brought to the feature grid (``mask_mode``) and the
    per-voxel error ``e = mean_k (F_t,k - adapter(F_s)_k)^2``:

    ``E_c^s = sum_{b, x} M_c^s e / (sum_{b, x} M_c^s + eps)``

    (sums over the whole batch). Normalising by the region size makes a small structure count as
    much as a large one. ``loss = sum_s w_s * mean_{c present} E_c^s`` where a class is present at
    a scale when ``sum M_c^s > 0`` (a scale with no present class adds 0).

    ``normalize=True`` (our option; the paper is silent) compares directions instead of raw
    activations: ``e = ||F_t/|F_t| - a(F_s)/|a(F_s)|||^2`` summed over channels, in ``[0, 4]``, so
    the term's size no longer depends on the teacher's activation scale (raw errors of a trained
    teacher can exceed the supervised loss by an order of magnitude).

    ``activation_weighting=True`` multiplies ``e`` by the teacher's channel-mean ``|F_t|``
    divided by its mean inside ``M_c^s`` (so the weight averages 1 over the region and ``E_c``
    keeps its scale, but voxels where the teacher responds strongly count more).

    Args:
        student_channels, teacher_channels: channels per scale; spatial_dims: 2 or 3.
        num_classes: label classes ``C`` (labels must lie in ``[0, C)``).
        weights: per-scale weights. mask_mode: ``"nearest"`` or ``"area"``.
        include_background: include class 0 in the class mean. eps: stabiliser.
        normalize: L2-normalise both features along channels first (see above).

    Shapes: feature sequences, label ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> scalar; zero
    when ``adapter(F_s)`` equals ``F_t``.
    """

    inputs = "features+label"

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        spatial_dims: int,
        num_classes: int,
        weights: Sequence[float] | None = None,
        mask_mode: str = "nearest",
        activation_weighting: bool = False,
        include_background: bool = True,
        eps: float = 1e-6,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        if mask_mode not in ("nearest", "area"):
            raise ValueError(f"mask_mode must be 'nearest' or 'area', got {mask_mode!r}.")
        if int(num_classes) < 1 or (not include_background and int(num_classes) < 2):
            raise ValueError(f"num_classes must be >= 1 (>= 2 without background), got {num_classes}.")
        self.adapters = build_adapters(student_channels, teacher_channels, spatial_dims)
        self.student_channels, self.teacher_channels = list(student_channels), list(teacher_channels)
        self.spatial_dims, self.num_classes = spatial_dims, int(num_classes)
        self.weights = resolve_weights(weights, len(self.adapters))
        self.mask_mode, self.activation_weighting = mask_mode, bool(activation_weighting)
        self.include_background, self.eps = bool(include_background), float(eps)

    def region_errors(self, error: torch.Tensor, masks: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``E_c`` for every class, ``(C,)``, from ``error (B, 1, *sp)``, ``masks (B, C, *sp)``."""
        masks, error = masks.flatten(2), error.flatten(2)
        size = masks.sum(dim=(0, 2))
        if self.activation_weighting:
            act = teacher.abs().mean(dim=1, keepdim=True).flatten(2)
            mean_in_mask = (masks * act).sum(dim=(0, 2)) / (size + self.eps)
            weighted = (masks * act * error).sum(dim=(0, 2)) / (mean_in_mask + self.eps)
        else:
            weighted = (masks * error).sum(dim=(0, 2))
        return weighted / (size + self.eps)

    def forward(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], label: torch.Tensor
    ) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        check_channels(student, self.student_channels, self.spatial_dims, "student")
        check_channels(teacher, self.teacher_channels, self.spatial_dims, "teacher")
        label = prepare_label(label, self.spatial_dims, self.num_classes).to(student[0].device)
        if label.shape[0] != student[0].shape[0]:
            raise ValueError(f"label batch {label.shape[0]} differs from feature batch {student[0].shape[0]}.")
        first = 0 if self.include_background else 1
        total = student[0].new_zeros(())
        for adapter, w, s, t in zip(self.adapters, self.weights, student, teacher, strict=True):
            t = t.detach()
            s = resize_to(adapter(s), t.shape[2:])
            if self.normalize:
                error = (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1, keepdim=True)
            else:
                error = (t - s).pow(2).mean(dim=1, keepdim=True)
            masks = one_hot_masks(label, self.num_classes, t.shape[2:], self.mask_mode).to(error.dtype)
            per_class = self.region_errors(error, masks, t)[first:]
            present = masks.flatten(2).sum(dim=(0, 2))[first:] > 0
            term = per_class[present].mean() if present.any() else error.sum() * 0.0
            total = total + w * term
        return total


class MSCALoss(nn.Module):
    r"""ReCo-KD multi-scale context alignment (MS-CA).

    Per scale both features are adaptive-average-pooled to a fixed grid ``P`` (``pool_size`` per
    axis, capped at the teacher's size on each axis), L2-normalised along channels, and
    ``A = F^T F`` (positions x positions cosine similarity, ``N = prod(P)``);
    ``l_s = mean((A_s - A_t)^2)`` and ``loss = sum_s w_s * l_s``.

    Channel-free (affinities are positions x positions), so student and teacher may differ in
    channels and resolution without adapters. Pooling bounds the ``N^2`` cost in 3D. The value
    lies in ``[0, 4]``, is invariant to the batch size and, when the grid divides the input size,
    to nearest upsampling of the inputs.

    Args:
        weights: per-scale weights (checked at call time).
        pool_size: pooled grid, one int for every axis or one per axis.
    """

    inputs = "features"

    def __init__(self, weights: Sequence[float] | None = None, pool_size: int | Sequence[int] = 8) -> None:
        super().__init__()
        sizes = [pool_size] if isinstance(pool_size, int) else list(pool_size)
        if not sizes or any(int(p) < 1 for p in sizes):
            raise ValueError(f"pool_size must be a positive int or a sequence of them, got {pool_size}.")
        self.weights, self.pool_size = weights, pool_size

    def grid(self, size: Sequence[int]) -> tuple[int, ...]:
        """Pooled grid for a teacher feature of spatial ``size``."""
        sizes = [self.pool_size] * len(size) if isinstance(self.pool_size, int) else list(self.pool_size)
        if len(sizes) != len(size):
            raise ValueError(f"pool_size {self.pool_size} has {len(sizes)} entries for {len(size)} spatial axes.")
        return tuple(min(int(p), int(n)) for p, n in zip(sizes, size, strict=True))

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        total = student[0].new_zeros(())
        for w, s, t in zip(resolve_weights(self.weights, len(student)), student, teacher, strict=True):
            grid = self.grid(t.shape[2:])
            pool = F.adaptive_avg_pool2d if t.ndim == 4 else F.adaptive_avg_pool3d
            a_s, a_t = pairwise_similarity(pool(s, grid)), pairwise_similarity(pool(t.detach(), grid))
            total = total + w * (a_s - a_t).pow(2).mean()
        return total


def region_means(feat: torch.Tensor, label: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-region mean features ``(B, C, K)`` and presence ``(B, C)`` on ``feat``'s grid."""
    masks = F.one_hot(label_to_grid(label, feat.shape[2:])[:, 0], num_classes).movedim(-1, 1).flatten(2)
    masks = masks.to(feat.dtype)
    counts = masks.sum(dim=2)
    sums = masks @ feat.flatten(2).transpose(1, 2)
    return sums / counts.clamp_min(1.0).unsqueeze(-1), counts > 0


class RegionAffinityLoss(nn.Module):
    r"""EMKD region affinity distillation (Qin et al., IEEE TMI 2021).

    Per scale and image, the label is resampled (nearest) to each network's feature grid and the
    class-region mean features ``r_k = sum_x M_k F / sum_x M_k`` are computed for student and
    teacher separately (channel- and resolution-free: no adapters). With
    ``R_ij = cos(r_i, r_j)``, the image loss is ``mean_{i < j} (R_s,ij - R_t,ij)^2`` over pairs
    of classes present in the image on both grids; images with fewer than two such classes are
    skipped, the rest averaged; ``loss = sum_s w_s * l_s`` (a scale with no valid image adds 0).

    Invariant to the batch size and to nearest upsampling (region means do not change).

    Args:
        num_classes: label classes ``C``. weights: per-scale weights (checked at call time).
    """

    inputs = "features+label"

    def __init__(self, num_classes: int, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (affinities need two regions), got {num_classes}.")
        self.num_classes, self.weights = int(num_classes), weights

    def forward(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], label: torch.Tensor
    ) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        label = prepare_label(label, student[0].ndim - 2, self.num_classes).to(student[0].device)
        if label.shape[0] != student[0].shape[0]:
            raise ValueError(f"label batch {label.shape[0]} differs from feature batch {student[0].shape[0]}.")
        upper = torch.ones(self.num_classes, self.num_classes, dtype=torch.bool, device=label.device).triu(1)
        total = student[0].new_zeros(())
        for w, s, t in zip(resolve_weights(self.weights, len(student)), student, teacher, strict=True):
            r_s, present_s = region_means(s, label, self.num_classes)
            r_t, present_t = region_means(t.detach(), label, self.num_classes)
            cos_s = F.normalize(r_s, dim=2) @ F.normalize(r_s, dim=2).transpose(1, 2)
            cos_t = F.normalize(r_t, dim=2) @ F.normalize(r_t, dim=2).transpose(1, 2)
            present = present_s & present_t
            pairs = (present.unsqueeze(2) & present.unsqueeze(1) & upper).to(cos_s.dtype)
            count = pairs.sum(dim=(1, 2))
            per_image = ((cos_s - cos_t).pow(2) * pairs).sum(dim=(1, 2)) / count.clamp_min(1.0)
            valid = count > 0
            term = per_image[valid].mean() if valid.any() else cos_s.sum() * 0.0
            total = total + w * term
        return total
