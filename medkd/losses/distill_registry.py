"""Registry of distillation losses by name, with the kind of inputs each one consumes.

Every class has an ``inputs`` attribute telling a composite loss how to call it:

* ``"logits"``: ``loss(student_logits, teacher_logits)``;
* ``"features"``: ``loss(student_feats, teacher_feats)`` (sequences, one tensor per scale);
* ``"logits+uncertainty"``: ``loss(student_logits, ensemble_uncertainty)`` (several live teachers);
* ``"features+label"``: ``loss(student_feats, teacher_feats, label)``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from medkd.losses.contrastive import SupervisedInfoNCELoss
from medkd.losses.features import AttentionTransferLoss, FeatureDistillationLoss, PairwiseSKDLoss
from medkd.losses.logits import (
    ChannelWiseDistillationLoss,
    KLDivergenceLoss,
    ProbabilityMSELoss,
    UncertaintyRegressionLoss,
)
from medkd.losses.pseudo import PseudoLabelLoss, SoftDiceLoss
from medkd.losses.regions import MSCALoss, MSSARDLoss, RegionAffinityLoss

__all__ = ["DISTILL_INPUTS", "DISTILL_LOSSES", "build_distill_loss", "describe"]

DISTILL_INPUTS = ("logits", "logits+uncertainty", "features", "features+label")

DISTILL_LOSSES: dict[str, type[nn.Module]] = {
    "kl": KLDivergenceLoss,
    "prob_mse": ProbabilityMSELoss,
    "cwd": ChannelWiseDistillationLoss,
    "feature": FeatureDistillationLoss,
    "attention": AttentionTransferLoss,
    "skd": PairwiseSKDLoss,
    "ms_sard": MSSARDLoss,
    "ms_ca": MSCALoss,
    "region_affinity": RegionAffinityLoss,
    "contrastive": SupervisedInfoNCELoss,
    "uncertainty": UncertaintyRegressionLoss,
    "pseudo_label": PseudoLabelLoss,
    "soft_dice": SoftDiceLoss,
}


def _lookup(name: str) -> type[nn.Module]:
    if name not in DISTILL_LOSSES:
        raise ValueError(f"Unknown distillation loss {name!r}; valid names: {sorted(DISTILL_LOSSES)}.")
    return DISTILL_LOSSES[name]


def build_distill_loss(name: str, **options: Any) -> nn.Module:
    """Build a distillation loss by registry name; ``options`` go to the class constructor.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    return _lookup(name)(**options)


def describe(name: str) -> str:
    """First line of the loss class docstring, e.g. ``describe("kl")``."""
    doc = (_lookup(name).__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""
