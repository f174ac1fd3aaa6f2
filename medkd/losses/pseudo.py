r"""Decision-level distillation: Dice-type losses against the teacher's labels or probabilities.

Voxel-averaged terms (KL, CE) weigh a class by its volume, so a structure of a few voxels (a lesion,
a vessel) hardly counts; Dice is normalised per class, which is why nnU-Net adds it to CE. These
losses bring that per-class normalisation to distillation.

**Pseudo labels** (:class:`PseudoLabelLoss`): the student learns the teacher's confident hard labels.

On unlabelled images the teacher's soft output is one target (KL); its *decision* is another, closer
to how the student is judged. Per voxel ``v`` the pseudo-label is ``y_v = argmax_c p_t,c`` and the
confidence ``q_v = max_c p_t,c`` (``p_t = softmax(z_t)``, ``T = 1``); voxels with ``q_v >= tau`` count
(mask ``m_v``). With student probabilities ``p_s = softmax(z_s)``:

.. math::

    CE = \frac{\sum_v m_v \,(-\log p_{s,v,y_v})}{\sum_v m_v}, \qquad
    Dice = 1 - \frac{1}{C} \sum_c \frac{2 \sum_v m_v p_{s,v,c} [y_v = c] + s}
                                      {\sum_v m_v p_{s,v,c} + \sum_v m_v [y_v = c] + s}

summed over the whole batch (``s = 1e-5``), ``loss = CE + Dice``; 0 when no voxel is confident. The
teacher input may be logits or the teacher-output cache's target logits (the same thing at ``T = 1``).
Gradients reach only the student.

**Soft Dice** (:class:`SoftDiceLoss`): the Dice above with the teacher's probabilities
``p_t = softmax(z_t / T)`` in place of the one-hot pseudo-label and no mask, foreground classes only
by default (as nnU-Net's Dice). A class's weight does not depend on its size, so the teacher's small
structures count as much as its large ones. Its minimum is the teacher's decision (a sharpened
``p_t``), not ``p_t`` itself: pair it with KL where calibrated probabilities matter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses.logits import check_logit_pair

SMOOTH = 1e-5


class PseudoLabelLoss(nn.Module):
    """Dice + CE of the student against the teacher's confident argmax (mask ``max p_t >= threshold``).

    Args:
        threshold: confidence ``tau`` in [0, 1); 0 keeps every voxel.
        dice_weight: weight of the Dice part (CE has weight 1).

    Shapes: student and teacher logits ``(B, C, *spatial)`` -> scalar.
    """

    inputs = "logits"

    def __init__(self, threshold: float = 0.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.threshold, self.dice_weight = float(threshold), float(dice_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        check_logit_pair(student_logits, teacher_logits)
        with torch.no_grad():
            confidence, target = torch.softmax(teacher_logits.detach().float(), dim=1).max(dim=1)
            mask = (confidence >= self.threshold).to(student_logits.dtype)
        if mask.sum() == 0:
            return student_logits.sum() * 0.0
        log_ps = F.log_softmax(student_logits, dim=1)
        ce = -(log_ps.gather(1, target[:, None]).squeeze(1) * mask).sum() / mask.sum()
        onehot = F.one_hot(target, student_logits.shape[1]).movedim(-1, 1).to(student_logits.dtype)
        dice = batch_dice_loss(log_ps.exp(), onehot, mask[:, None])
        return ce + self.dice_weight * dice


def batch_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean_c (2 sum_v m p t + s) / (sum_v m p + sum_v m t + s)`` over batch and space.

    ``probs`` and ``target`` ``(B, C, *spatial)``; ``mask`` ``(B, 1, *spatial)`` or None (all voxels).
    """
    axes = [0, *range(2, probs.ndim)]
    if mask is not None:
        probs, target = mask * probs, mask * target
    overlap = (probs * target).sum(axes)
    total = probs.sum(axes) + target.sum(axes)
    return 1.0 - ((2 * overlap + SMOOTH) / (total + SMOOTH)).mean()


class SoftDiceLoss(nn.Module):
    """Dice between the student's and the teacher's class probabilities, per class over the batch.

    Args:
        temperature: ``T > 0`` applied to both sides (``T = 1``: the teacher's own probabilities).
        include_background: also average over class 0 (default: foreground classes only).

    Shapes: student and teacher logits ``(B, C, *spatial)`` -> scalar in ``[0, 1]``. Gradients reach
    only the student.
    """

    inputs = "logits"

    def __init__(self, temperature: float = 1.0, include_background: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.include_background = float(temperature), bool(include_background)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        check_logit_pair(student_logits, teacher_logits)
        if student_logits.shape[1] < 2 and not self.include_background:
            raise ValueError("soft Dice without background needs at least 2 classes")
        first = 0 if self.include_background else 1
        teacher = teacher_logits.detach()
        teacher = teacher.to(torch.promote_types(teacher.dtype, torch.float32))  # float16 cache -> float32
        p_t = torch.softmax(teacher / self.temperature, dim=1).to(student_logits.dtype)
        p_s = torch.softmax(student_logits / self.temperature, dim=1)
        return batch_dice_loss(p_s[:, first:], p_t[:, first:])
