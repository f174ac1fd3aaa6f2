"""What the trainer optimises: a *task* turns a batch into named loss terms.

The interface is mdistiller's ``Distiller`` reduced to what the loop needs:

* ``forward(batch) -> dict[str, Tensor]``: the loss terms, already weighted, plus ``"loss"``, their
  sum (the loop calls ``backward`` on it). ``forward`` is the training forward so that DDP, which
  wraps ``forward``, synchronises gradients.
* ``network``: the deployable network (what is saved as ``state_dict`` and evaluated).
* ``extra_modules()``: trainable helpers that are not deployed (distillation adapters, projection
  heads): optimised and checkpointed as ``extra_state``, dropped on export.

A distillation task adds a frozen teacher and distillation terms without touching the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from medkd.losses import DeepSupervisionLoss


class SupervisedTask(nn.Module):
    """Train ``network`` on labels alone with one supervised loss (deep supervision aware)."""

    def __init__(self, network: nn.Module, loss: nn.Module, term_name: str = "seg"):
        super().__init__()
        self.network = network
        self.loss = DeepSupervisionLoss(loss)
        self.term_name = term_name

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.network(batch["image"])
        term = self.loss(logits, batch["label"])
        return {"loss": term, self.term_name: term.detach()}

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict()
