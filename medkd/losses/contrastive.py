"""Label-supervised contrastive distillation between student anchors and teacher keys (InfoNCE/SupCon).

medkd's reading of the multi-task multi-scale contrastive KD paper (arXiv 2406.03173): positives
are teacher embeddings of the same class (SupCon, Khosla et al. 2020), not the same image's
teacher feature as in the public code (which used no labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses.features import (
    check_channel_lists,
    check_channels,
    check_feature_pairs,
    label_to_grid,
    prepare_label,
    resize_to,
    resolve_weights,
)

__all__ = ["SupervisedInfoNCELoss", "projection_head"]


def projection_head(in_channels: int, embed_dim: int, spatial_dims: int) -> nn.Sequential:
    """``1x1 conv (in -> in) -> ReLU -> 1x1 conv (in -> embed_dim)``; outputs are L2-normalised by the loss."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(in_channels, in_channels, 1), nn.ReLU(inplace=True), conv(in_channels, embed_dim, 1))


class SupervisedInfoNCELoss(nn.Module):
    r"""Multi-scale label-supervised contrastive distillation (student anchors, teacher keys).

    Per scale ``s``: the student feature is resized to the teacher's grid and the label resampled
    (nearest) to it; :meth:`sample_indices` draws up to ``samples_per_class`` voxels per class and
    image (bounded memory in 3D). For the ``n`` sampled voxels, anchors ``a_i`` are the student
    projection-head embeddings and keys ``k_j`` the teacher projection-head embeddings of the same
    voxels (both L2-normalised; teacher features are detached, but the teacher head is trained).
    With ``P(i) = {j : y_j = y_i}`` (the same voxel's key included, across the batch):

    ``loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(a_i.k_p / tau) / sum_{j=1..n} exp(a_i.k_j / tau) )``

    ``l_s`` is the mean over anchors with at least one positive and ``loss = sum_s w_s * l_s``.

    Normalisation: like every InfoNCE, the value depends on the number of keys ``n``: it is
    bounded below by ``mean_i log|P(i)|`` and duplicating every key adds ``log 2``. It is not zero
    when student equals teacher.

    Heads (created here, one pair per scale, hence trained and checkpointed with the loss):
    ``1x1 conv -> ReLU -> 1x1 conv`` (hidden width = input channels, SimCLR/SupCon style), applied
    to the sampled voxels only (identical to applying them densely).

    Sampling: a ``torch.Generator`` seeded with ``seed`` whose state is the buffer ``sampler_state``
    (successive calls draw different voxels, a run is reproducible, and a checkpoint holds where the
    stream stands, so a resumed run draws on exactly); without ``seed`` the global RNG is used. The
    indices used at each scale by the last call are kept in ``last_indices``.

    Args:
        student_channels, teacher_channels: channels per scale; spatial_dims: 2 or 3.
        embed_dim: embedding size. temperature: ``tau > 0``.
        samples_per_class: maximum sampled voxels per class per image.
        weights: per-scale weights. seed: sampling seed.

    Shapes: feature sequences, label ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> scalar.
    """

    inputs = "features+label"

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        spatial_dims: int,
        embed_dim: int = 64,
        temperature: float = 0.1,
        samples_per_class: int = 64,
        weights: Sequence[float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        student_channels, teacher_channels = check_channel_lists(student_channels, teacher_channels, spatial_dims)
        if int(embed_dim) < 1 or int(samples_per_class) < 1 or not temperature > 0:
            raise ValueError(f"embed_dim ({embed_dim}) and samples_per_class ({samples_per_class}) must be >= 1 "
                             f"and temperature ({temperature}) > 0.")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.spatial_dims = spatial_dims
        self.student_heads = nn.ModuleList(projection_head(c, int(embed_dim), spatial_dims) for c in student_channels)
        self.teacher_heads = nn.ModuleList(projection_head(c, int(embed_dim), spatial_dims) for c in teacher_channels)
        self.temperature, self.samples_per_class = float(temperature), int(samples_per_class)
        self.weights = resolve_weights(weights, len(student_channels))
        self.seed = seed
        if seed is not None:
            self.register_buffer("sampler_state", torch.Generator().manual_seed(int(seed)).get_state())
        self.last_indices: list[torch.Tensor] = []

    def _random_keys(self, count: int) -> torch.Tensor:
        """``count`` uniform numbers from the seeded stream (advancing ``sampler_state``) or the global RNG."""
        if self.seed is None:
            return torch.rand(count)
        generator = torch.Generator()
        generator.set_state(self.sampler_state.cpu())
        keys = torch.rand(count, generator=generator)
        self.sampler_state.copy_(generator.get_state())
        return keys

    def sample_indices(self, label_small: torch.Tensor) -> torch.Tensor:
        """Flat indices into ``B * N`` (sorted) of up to ``samples_per_class`` random voxels per
        (image, class), from a label ``(B, 1, *spatial)`` or ``(B, *spatial)`` on the feature grid.

        A voxel ``i`` of image ``b`` has index ``b * N + i`` (``N`` = voxels per image). Sampling is
        uniform without replacement within each (image, class) group, done on the CPU.
        """
        labels = label_small.detach().reshape(label_small.shape[0], -1).long().cpu()
        batch, voxels = labels.shape
        group = (torch.arange(batch).unsqueeze(1) * (int(labels.max()) + 1) + labels).reshape(-1)
        keys = self._random_keys(group.numel())
        order = torch.argsort(keys)
        order = order[torch.argsort(group[order], stable=True)]  # grouped, random order inside a group
        sorted_groups = group[order]
        counts = torch.bincount(sorted_groups)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[sorted_groups]
        return torch.sort(order[rank < self.samples_per_class]).values.to(label_small.device)

    @staticmethod
    def _embed(head: nn.Sequential, vectors: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        """Apply a 1x1-conv head to ``(n, K)`` vectors -> L2-normalised ``(n, E)``."""
        shaped = vectors.transpose(0, 1).reshape(1, vectors.shape[1], vectors.shape[0], *([1] * (spatial_dims - 1)))
        return F.normalize(head(shaped).reshape(-1, vectors.shape[0]).transpose(0, 1), dim=1)

    def info_nce(self, anchors: torch.Tensor, keys: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """SupCon InfoNCE for anchors/keys ``(n, E)`` (normalised) with classes ``(n,)``."""
        log_prob = F.log_softmax(anchors @ keys.T / self.temperature, dim=1)
        positives = (classes.unsqueeze(1) == classes.unsqueeze(0)).to(log_prob.dtype)
        count = positives.sum(dim=1)
        per_anchor = -(positives * log_prob).sum(dim=1) / count.clamp_min(1.0)
        return per_anchor[count > 0].mean()

    def forward(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], label: torch.Tensor
    ) -> torch.Tensor:
        student, teacher = check_feature_pairs(student_feats, teacher_feats)
        check_channels(student, self.student_channels, self.spatial_dims, "student")
        check_channels(teacher, self.teacher_channels, self.spatial_dims, "teacher")
        label = prepare_label(label, self.spatial_dims).to(student[0].device)
        if label.shape[0] != student[0].shape[0]:
            raise ValueError(f"label batch {label.shape[0]} differs from feature batch {student[0].shape[0]}.")
        self.last_indices = []
        total = student[0].new_zeros(())
        heads = zip(self.student_heads, self.teacher_heads, self.weights, student, teacher, strict=True)
        for s_head, t_head, w, s, t in heads:
            s, t = resize_to(s, t.shape[2:]), t.detach()
            small = label_to_grid(label, t.shape[2:]).reshape(-1)
            idx = self.sample_indices(small.reshape(t.shape[0], -1))
            self.last_indices.append(idx)
            per_image = small.numel() // t.shape[0]
            image, voxel = idx // per_image, idx % per_image
            s_vec, t_vec = s.flatten(2)[image, :, voxel], t.flatten(2)[image, :, voxel]  # (n, K), no dense copy
            anchors = self._embed(s_head, s_vec, self.spatial_dims)
            keys = self._embed(t_head, t_vec, self.spatial_dims)
            total = total + w * self.info_nce(anchors, keys, small[idx])
        return total
