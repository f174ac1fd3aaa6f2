r"""Pseudo-label distillation: the student learns the teacher's confident hard labels with Dice + CE.

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
        ps, m = log_ps.exp(), mask[:, None]
        axes = [0, *range(2, student_logits.ndim)]
        overlap = (m * ps * onehot).sum(axes)
        total = (m * ps).sum(axes) + (m * onehot).sum(axes)
        dice = 1.0 - ((2 * overlap + SMOOTH) / (total + SMOOTH)).mean()
        return ce + self.dice_weight * dice
