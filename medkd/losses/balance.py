r"""Automatic balancing of distillation terms against the supervised loss (optional, per term).

Feature and logit distillation losses live on other scales than Dice+CE (a raw feature error can be
30x the supervised loss on a trained teacher, a KL term 0.01x of it), so a recipe weight chosen on
one dataset means something else on the next. A balanced term is rescaled so that, on average, it
contributes ``weight`` times the supervised loss:

.. math::

    a_t = m\,a_{t-1} + (1-m)\,L_{sup,t}, \qquad b_{k,t} = m\,b_{k,t-1} + (1-m)\,L_{k,t},

    \text{term}_k = w_k \cdot \frac{a_t}{\max(b_{k,t}, \epsilon)} \cdot L_{k,t},

with exponential moving averages (momentum ``m``, initialised with the first value seen) of the
*detached* losses. The factor ``a_t / b_{k,t}`` is a number at each step, not part of the graph: the
gradient of a balanced term is the gradient of ``L_k`` times a positive weight, so balancing only
re-weights the sum (it never alters, projects or clips gradients). Steps without labelled samples
(supervised loss 0 by construction) do not update ``a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TermBalancer(nn.Module):
    """Moving averages of the supervised loss and of each balanced term; checkpointed as buffers.

    Args:
        names: the balanced terms (any order: ``terms[i]`` belongs to ``sorted(names)[i]``).
        momentum: EMA momentum ``m`` in [0, 1).
        eps: lower bound of a term's average in the denominator.
    """

    def __init__(self, names: Sequence[str], momentum: float = 0.99, eps: float = 1e-8):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        # sorted: the buffers are indexed by name order, and a resumed run rebuilds the recipe from its
        # stored config, whose term order may differ from the recipe file's
        self.names = sorted(names)
        self.momentum, self.eps = momentum, eps
        self.register_buffer("supervised", torch.zeros(()))
        self.register_buffer("terms", torch.zeros(len(self.names)))
        self.register_buffer("seen", torch.zeros(len(self.names) + 1, dtype=torch.bool))

    def _update(self, average: torch.Tensor, index: int, value: torch.Tensor) -> None:
        value = value.detach().float()
        if bool(self.seen[index]):
            average.mul_(self.momentum).add_((1 - self.momentum) * value)
        else:
            average.copy_(value)
            self.seen[index] = True

    def observe_supervised(self, value: torch.Tensor) -> None:
        """Record the (weighted) supervised loss of a step that had labelled samples."""
        if self.training:
            self._update(self.supervised, 0, value)

    def scale(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The factor ``a / max(b_k, eps)`` for term ``name`` (updates ``b_k`` in training mode)."""
        index = self.names.index(name)
        if self.training:
            self._update(self.terms[index], index + 1, value)
        if not bool(self.seen[0]):
            return torch.ones((), device=value.device)
        return (self.supervised / self.terms[index].clamp_min(self.eps)).to(value.device)
