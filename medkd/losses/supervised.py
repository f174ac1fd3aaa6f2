"""Supervised segmentation losses on integer label maps.

Convention for every loss here: ``forward(logits, target)`` with

* ``logits``: ``(B, C, *spatial)`` raw scores, 2D (ndim 4) or 3D (ndim 5);
* ``target``: integer labels ``(B, 1, *spatial)`` or ``(B, *spatial)`` with values in ``[0, C)``
  (float tensors holding whole numbers are accepted);

and the result is a scalar normalised per voxel (it does not grow with image or batch size).
Dice and cross-entropy come from MONAI; the Lovász-Softmax loss is implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import monai.losses as mlosses
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceLoss",
    "DiceLovaszLoss",
    "LovaszSoftmaxLoss",
    "build_supervised_loss",
    "prepare_target",
]


def prepare_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Validate ``(logits, target)`` and return the target as ``long`` of shape ``(B, 1, *spatial)``.

    Raises:
        ValueError: logits not 4D/5D, NaN in logits, shape mismatch, non-integral labels or a
            label outside ``[0, C)`` (``ignore_index`` excepted).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be torch.Tensor.")
    if logits.ndim not in (4, 5):
        raise ValueError(f"logits must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(logits.shape)}.")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN.")
    batch, num_classes, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    shape_ok = target.ndim == logits.ndim and target.shape[1] == 1 and target.shape[0] == batch
    if not shape_ok or tuple(target.shape[2:]) != spatial:
        raise ValueError(
            f"target shape {tuple(target.shape)} is incompatible with logits {tuple(logits.shape)}; "
            f"expected ({batch}, 1, *{spatial}) or ({batch}, *{spatial})."
        )
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError("target must hold integer class labels; got non-integral values.")
    elif target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must be an integer label map, got dtype {target.dtype}.")
    target = target.long()
    valid = target if ignore_index is None else target[target != ignore_index]
    bad = valid[(valid < 0) | (valid >= num_classes)]
    if bad.numel():
        raise ValueError(f"target contains label {int(bad[0])} outside [0, {num_classes}) for C={num_classes} logits.")
    return target


# ----------------------------------------------------------------------------- Lovász


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Lovász extension weights ``g`` for foreground indicators sorted by decreasing error, shape (C, V)."""
    gts = gt_sorted.sum(dim=-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(dim=-1)
    union = gts + (1.0 - gt_sorted).cumsum(dim=-1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


def _lovasz_flat(probs: torch.Tensor, labels: torch.Tensor, classes: str) -> torch.Tensor:
    """Lovász-Softmax of flattened ``probs`` (C, V) against ``labels`` (V,)."""
    num_classes = probs.shape[0]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    fg = F.one_hot(labels, num_classes).T.to(probs.dtype)  # (C, V)
    if classes == "present":
        keep = fg.sum(dim=1) > 0
        probs, fg = probs[keep], fg[keep]
    errors = (fg - probs).abs()
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    fg_sorted = torch.gather(fg, 1, order)
    per_class = (errors_sorted * _lovasz_grad(fg_sorted)).sum(dim=1)
    return per_class.mean()


class LovaszSoftmaxLoss(nn.Module):
    r"""Lovász-Softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018): a convex surrogate of
    the Jaccard (IoU) loss.

    With ``p = softmax(logits)`` over the class axis, for each class ``c`` (voxels flattened):

    * errors ``e_i = |y_ic - p_ic|`` sorted in decreasing order, ``y`` (one-hot) sorted the same way;
    * ``gts = sum(y)``, ``I = gts - cumsum(y)``, ``U = gts + cumsum(1 - y)``, ``J = 1 - I / U``;
    * ``g = J`` with ``g[1:] = J[1:] - J[:-1]``;
    * ``loss_c = dot(e_sorted, g)``.

    The loss is the mean of ``loss_c`` over classes: all ``C`` classes (``classes="all"``) or only
    the classes present in the target (``"present"``, default); if none is present (every voxel
    ignored) the loss is 0 while keeping the graph. ``per_image=True`` computes it per image and
    averages over the batch; otherwise the whole batch is one flattened set of voxels. The value
    lies in ``[0, 1]`` and is invariant to repeating every voxel (per-voxel normalised).

    Args:
        per_image: average per-image losses instead of one loss over the batch.
        classes: ``"present"`` or ``"all"``.
        ignore_index: label value excluded from the loss.

    Shapes: logits ``(B, C, *spatial)``, target ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> scalar.
    """

    def __init__(self, per_image: bool = False, classes: str = "present", ignore_index: int | None = None) -> None:
        super().__init__()
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present' or 'all', got {classes!r}.")
        self.per_image = per_image
        self.classes = classes
        self.ignore_index = ignore_index

    def _single(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """probs (C, V), labels (V,) -> scalar, dropping ignored voxels."""
        if self.ignore_index is not None:
            keep = labels != self.ignore_index
            probs, labels = probs[:, keep], labels[keep]
        return _lovasz_flat(probs, labels, self.classes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = prepare_target(logits, target, self.ignore_index)
        batch, num_classes = logits.shape[:2]
        probs = torch.softmax(logits, dim=1).reshape(batch, num_classes, -1)
        labels = labels.reshape(batch, -1)
        if self.per_image:
            return torch.stack([self._single(probs[b], labels[b]) for b in range(batch)]).mean()
        return self._single(probs.transpose(0, 1).reshape(num_classes, -1), labels.reshape(-1))


# ----------------------------------------------------------------------------- MONAI wrappers


class DiceLoss(nn.Module):
    """Soft Dice loss from MONAI (``monai.losses.DiceLoss(to_onehot_y=True, softmax=True, **kwargs)``).

    ``1 - 2|p∩y| / (|p| + |y|)`` per image and class, averaged. ``kwargs`` go to MONAI
    (e.g. ``include_background``, ``batch``, ``smooth_nr``, ``smooth_dr``, ``weight``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.loss = mlosses.DiceLoss(to_onehot_y=True, softmax=True, **kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, prepare_target(logits, target))


class DiceCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CrossEntropy`` from MONAI
    (``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.loss = mlosses.DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, prepare_target(logits, target))


class CrossEntropyLoss(nn.Module):
    """Voxel-averaged softmax cross-entropy ``-mean_i log p_{i, y_i}`` accepting ``(B, 1, *spatial)`` targets.

    Args:
        weight: optional per-class weights ``(C,)``.
        ignore_index: label excluded from the average.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(
        self,
        weight: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = prepare_target(logits, target, self.ignore_index).squeeze(1)
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        return F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore, label_smoothing=self.label_smoothing)


class DiceLovaszLoss(nn.Module):
    """``dice_weight * Dice (MONAI) + lovasz_weight * LovaszSoftmax``.

    Args:
        dice_weight, lovasz_weight: non-negative mixing weights.
        per_image, classes: passed to :class:`LovaszSoftmaxLoss`.
        dice_kwargs: passed to :class:`DiceLoss` (MONAI options).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        per_image: bool = False,
        classes: str = "present",
        dice_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or lovasz_weight < 0:
            raise ValueError(f"weights must be >= 0, got dice={dice_weight}, lovasz={lovasz_weight}.")
        self.dice_weight, self.lovasz_weight = float(dice_weight), float(lovasz_weight)
        self.dice = DiceLoss(**(dice_kwargs or {}))
        self.lovasz = LovaszSoftmaxLoss(per_image=per_image, classes=classes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.lovasz_weight * self.lovasz(logits, target)


# ----------------------------------------------------------------------------- deep supervision


def _is_deep_supervised(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """True when ``logits`` are stacked heads ``(B, K, C, *spatial)`` for ``target``."""
    if logits.ndim < 5:
        return False
    spatial = tuple(logits.shape[3:])
    if target.ndim == logits.ndim - 2:  # (B, *spatial)
        return tuple(target.shape[1:]) == spatial
    if target.ndim == logits.ndim - 1:  # (B, 1, *spatial), unless it is a plain (B, *spatial) target
        plain = tuple(target.shape[1:]) == tuple(logits.shape[2:])
        return not plain and target.shape[1] == 1 and tuple(target.shape[2:]) == spatial
    return False


class DeepSupervisionLoss(nn.Module):
    """nnU-Net style deep supervision around any loss ``base(logits, target)``.

    If ``logits`` are stacked heads ``(B, K, C, *spatial)`` (MONAI DynUNet in train mode; head 0
    is the full-resolution output), returns ``sum_k w_k * base(logits[:, k], target)`` with
    ``w_k = 2^-k / sum_j 2^-j`` by default (user ``weights`` are also normalised to sum 1).
    Plain logits ``(B, C, *spatial)`` give ``base(logits, target)``.
    """

    def __init__(self, base: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not callable(base):
            raise TypeError(f"base must be a callable loss, got {type(base).__name__}.")
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"weights must be non-negative with a positive sum, got {weights}.")
        self.base = base
        self.weights = weights

    def head_weights(self, num_heads: int) -> list[float]:
        """Normalised weights for ``num_heads`` heads."""
        raw = [0.5**k for k in range(num_heads)] if self.weights is None else self.weights
        if len(raw) != num_heads:
            raise ValueError(f"got {len(raw)} deep-supervision weights for {num_heads} heads.")
        total = sum(raw)
        return [w / total for w in raw]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not _is_deep_supervised(logits, target):
            return self.base(logits, target)
        weights = self.head_weights(logits.shape[1])
        return sum(w * self.base(logits[:, k], target) for k, w in enumerate(weights) if w > 0)


def full_resolution_head(output: torch.Tensor, input_ndim: int) -> torch.Tensor:
    """The full-resolution logits ``(B, C, *spatial)`` of a network output for an input of ``input_ndim``.

    Deep-supervised outputs ``(B, K, C, *spatial)`` (one more axis than the input) give head 0;
    plain logits are returned as they are.
    """
    return output[:, 0] if output.ndim == input_ndim + 1 else output


# ----------------------------------------------------------------------------- factory

_LOSSES: dict[str, type[nn.Module]] = {
    "dice_ce": DiceCELoss,
    "dice_lovasz": DiceLovaszLoss,
    "ce": CrossEntropyLoss,
    "dice": DiceLoss,
    "lovasz": LovaszSoftmaxLoss,
}


def build_supervised_loss(name: str, **options: Any) -> nn.Module:
    """Build a supervised loss by name (``dice_ce``, ``dice_lovasz``, ``ce``, ``dice``, ``lovasz``).

    ``options`` are passed to the loss class constructor.
    """
    if name not in _LOSSES:
        raise ValueError(f"Unknown supervised loss {name!r}; valid names: {sorted(_LOSSES)}.")
    return _LOSSES[name](**options)
