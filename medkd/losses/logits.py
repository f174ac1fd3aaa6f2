"""Logit (output-level) distillation losses: temperature KL, probability MSE and channel-wise KD.

Convention: ``forward(student_logits, teacher_logits, ...)`` with both tensors ``(B, C, *spatial)``
(2D: ndim 4, 3D: ndim 5) of the same shape. The teacher side is always detached. KL and
probability MSE are averaged over voxels (they do not grow with image or batch size).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ChannelWiseDistillationLoss",
    "KLDivergenceLoss",
    "ProbabilityMSELoss",
    "UncertaintyRegressionLoss",
    "check_logit_pair",
]


def check_logit_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``student`` and ``teacher`` are same-shape 4D/5D tensors without NaN."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher inputs must be torch.Tensor.")
    if student.ndim not in (4, 5):
        raise ValueError(f"logits must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(student.shape)}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ; "
            "resample the teacher output to the student's grid (and match the class count) first."
        )
    if torch.isnan(student).any() or torch.isnan(teacher).any():
        raise ValueError("student or teacher input contains NaN.")


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return float(temperature)


def _teacher_log_probs(teacher: torch.Tensor, temperature: float, is_probs: bool) -> torch.Tensor:
    """``log p_t``: ``log_softmax(z_t / T)``, or for probabilities ``log(p^(1/T) / sum_c p^(1/T))``."""
    teacher = teacher.detach()
    if not is_probs:
        return F.log_softmax(teacher / temperature, dim=1)
    if (teacher < 0).any() or not torch.allclose(teacher.sum(1), torch.ones_like(teacher[:, 0]), atol=1e-3):
        raise ValueError("teacher probabilities must be non-negative and sum to 1 over the class axis (dim 1).")
    tiny = torch.finfo(teacher.dtype).tiny
    return F.log_softmax(teacher.clamp_min(tiny).log() / temperature, dim=1)


def _voxel_weights(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``mask`` ((B, 1, *spatial) or (B, *spatial), bool or non-negative) as weights shaped like ``values``."""
    if mask.ndim == values.ndim - 1:
        mask = mask.unsqueeze(1)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be {tuple(values.shape)} or without the channel axis.")
    mask = mask.to(values.dtype)
    if (mask < 0).any():
        raise ValueError("mask weights must be non-negative.")
    return mask


def _masked_voxel_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-voxel ``values`` (B, 1, *spatial) over all voxels or weighted by ``mask``."""
    if mask is None:
        return values.mean()
    mask = _voxel_weights(mask, values)
    total = mask.sum()
    if total <= 0:
        return values.sum() * 0.0  # empty mask: zero that keeps the graph
    return (values * mask).sum() / total


class KLDivergenceLoss(nn.Module):
    r"""Temperature-scaled KL divergence (Hinton et al. 2015), averaged over voxels.

    ``loss = T^2 * mean_voxels sum_c p_t,c (log p_t,c - log p_s,c)`` with ``p = softmax(z / T)``
    over the class axis. Unlike ``F.kl_div(reduction="batchmean")`` on a ``(B, C, H, W)`` tensor,
    which divides by ``B`` only, the value does not grow with image size. With a ``mask``
    ``(B, 1, *spatial)`` or ``(B, *spatial)`` (bool or non-negative weights) the average is
    ``sum(mask * kl) / sum(mask)`` (0 for an empty mask).

    ``class_balanced``: the voxel mean weighs a class by its volume, so a structure of a few voxels
    hardly counts. With this option each voxel ``v`` is weighted by ``1 / n_a(v)``, where ``a(v)``
    is the teacher's argmax class and ``n_c`` the (mask-weighted) number of voxels of class ``c`` in
    the batch: the loss becomes the mean over the classes present of each class's mean KL.

    Args:
        temperature: ``T > 0``; the ``T^2`` factor keeps gradient magnitudes comparable across ``T``.
        teacher_is_probs: the second input holds probabilities ``p`` (e.g. an averaged ensemble or
            a cache), not logits. They are softened as ``p^(1/T) / sum_c p^(1/T)``, which equals
            ``softmax(z / T)`` when ``p = softmax(z)``.
        class_balanced: weight voxels by the inverse frequency of the teacher's class (see above).

    Shapes: ``(B, C, *spatial)`` twice -> scalar. Zero when the two distributions are equal.
    """

    inputs = "logits"

    def __init__(self, temperature: float = 4.0, teacher_is_probs: bool = False, class_balanced: bool = False) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.teacher_is_probs = bool(teacher_is_probs)
        self.class_balanced = bool(class_balanced)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_logit_pair(student_logits, teacher_logits)
        t = self.temperature
        log_pt = _teacher_log_probs(teacher_logits, t, self.teacher_is_probs)
        log_ps = F.log_softmax(student_logits / t, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1, keepdim=True)
        if self.class_balanced:
            weights = torch.ones_like(kl) if mask is None else _voxel_weights(mask, kl)
            mask = _class_balance_weights(log_pt, weights)
        return t * t * _masked_voxel_mean(kl, mask)


def _class_balance_weights(log_pt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-voxel weights ``m_v / n_a(v)`` (``B, 1, *spatial``): ``a`` the teacher's argmax class, ``n_c``
    the ``weights``-weighted count of class ``c`` in the batch."""
    winner = log_pt.argmax(dim=1, keepdim=True)
    counts = torch.zeros(log_pt.shape[1], dtype=log_pt.dtype, device=log_pt.device)
    counts.scatter_add_(0, winner.flatten(), weights.flatten())
    return weights / counts.clamp_min(torch.finfo(log_pt.dtype).tiny)[winner]


class ProbabilityMSELoss(nn.Module):
    r"""Mean squared error between class probabilities (ensemble distillation), averaged over voxels.

    ``loss = mean_voxels sum_c (p_s,c - p_t,c)^2`` with ``p = softmax(z / T)`` (``T = 1`` by
    default, as in the ensemble paper, which adds ``0.1 x`` cross-entropy as a separate term).

    Args:
        temperature: ``T > 0`` applied to both sides (no ``T^2`` factor).
        teacher_is_probs: the second input holds probabilities (averaged ensemble, cache);
            softened as ``p^(1/T)`` renormalised (identity for ``T = 1``).
        teacher_probs: alias of ``teacher_is_probs`` (when given it takes precedence).

    Shapes: ``(B, C, *spatial)`` twice, optional ``mask`` as in :class:`KLDivergenceLoss` -> scalar
    in ``[0, 2]``; zero when the distributions are equal.
    """

    inputs = "logits"

    def __init__(
        self, temperature: float = 1.0, teacher_is_probs: bool = False, teacher_probs: bool | None = None
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.teacher_is_probs = bool(teacher_is_probs if teacher_probs is None else teacher_probs)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_logit_pair(student_logits, teacher_logits)
        p_t = _teacher_log_probs(teacher_logits, self.temperature, self.teacher_is_probs).exp()
        p_s = torch.softmax(student_logits / self.temperature, dim=1)
        return _masked_voxel_mean((p_s - p_t).pow(2).sum(dim=1, keepdim=True), mask)


class ChannelWiseDistillationLoss(nn.Module):
    r"""Channel-wise distillation, CWD (Shu et al., ICCV 2021).

    For every image ``b`` and channel ``c`` the map ``z_c`` is turned into a distribution over
    spatial positions ``phi(z_c) = softmax(z_c / T)`` (flattened ``*spatial``), and

    ``loss = T^2 / C * sum_c KL(phi(z_t,c) || phi(z_s,c))``, averaged over the batch.

    This is a KL between spatial distributions, not a mean over voxels: it is invariant to
    duplicating the batch and to repeating voxels (nearest upsampling), but it is not per-voxel
    normalised by construction (finer independent detail can raise it, up to ``log N``).

    Optional channel adapter: when ``student_channels`` and ``teacher_channels`` are given and
    differ, a 1x1 convolution (``spatial_dims`` 2 or 3) maps the student to the teacher's
    channels (for CWD on features); otherwise inputs must have the same shape (logits).

    Shapes: ``(B, C, *spatial)`` twice -> scalar; zero when student equals teacher.
    """

    inputs = "logits"

    def __init__(
        self,
        temperature: float = 4.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.adapter: nn.Module = nn.Identity()
        if student_channels is not None and teacher_channels is not None and student_channels != teacher_channels:
            conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
            self.adapter = conv(int(student_channels), int(teacher_channels), kernel_size=1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if isinstance(self.adapter, nn.Conv2d | nn.Conv3d):
            expected = (self.adapter.weight.ndim, self.adapter.in_channels)
            if (student_logits.ndim, student_logits.shape[1] if student_logits.ndim > 1 else -1) != expected:
                raise ValueError(
                    f"student input {tuple(student_logits.shape)} must have ndim {expected[0]} and "
                    f"{expected[1]} channels for the adapter."
                )
            student_logits = self.adapter(student_logits)
        check_logit_pair(student_logits, teacher_logits)
        t = self.temperature
        batch, channels = student_logits.shape[:2]
        log_ps = F.log_softmax(student_logits.reshape(batch, channels, -1) / t, dim=-1)
        log_pt = F.log_softmax(teacher_logits.detach().reshape(batch, channels, -1) / t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # (B, C)
        return t * t * kl.mean()


class UncertaintyRegressionLoss(nn.Module):
    r"""The student also regresses the ensemble's per-voxel uncertainty map (ensemble paper option).

    A 1x1 convolution head (trainable, kept in ``extra_state``, not deployed) maps the student's
    logits to ``u_hat = 0.5 * sigmoid(head(z_s))`` in ``[0, 0.5]``; the target is the ensemble's
    ``u(x) = mean_c std_m p_m,c(x)`` (:func:`medkd.teachers.combine.voxel_uncertainty`, population
    std of member probabilities at ``T = 1``). ``loss = mean over voxels (u_hat - u)^2``.

    Args:
        num_classes: ``C``, the channels of the student logits.
        spatial_dims: 2 or 3.

    Shapes: ``student_logits (B, C, *spatial)``, ``uncertainty (B, 1, *spatial)`` -> scalar.
    The target is detached; gradients reach the head and, through the logits, the student.
    """

    inputs = "logits+uncertainty"

    def __init__(self, num_classes: int, spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(int(num_classes), 1, kernel_size=1)

    def forward(self, student_logits: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        if uncertainty.shape != (student_logits.shape[0], 1, *student_logits.shape[2:]):
            raise ValueError(f"uncertainty {tuple(uncertainty.shape)} must be (B, 1, *spatial) of the student "
                             f"logits {tuple(student_logits.shape)}.")
        predicted = 0.5 * torch.sigmoid(self.head(student_logits))
        return (predicted - uncertainty.detach().to(predicted.dtype)).pow(2).mean()
