r"""Combining several teachers (an ensemble of members) into one distillation target.

Convention: member outputs are stacked on a new leading axis, ``(M, B, C, *spatial)`` with ``M``
members and 2D (ndim 5) or 3D (ndim 6) spatial axes; the class axis is ``dim=2``. Combined
targets are class probabilities ``(B, C, *spatial)`` that sum to one over ``C`` at every voxel.

Three different targets (see ``methods.md``, "Several teachers"), each a documented option:

* ``"mean_prob"`` (:func:`mean_probabilities`): average member probabilities (ensemble paper);
  the per-class std over members is the uncertainty map (:func:`member_uncertainty`).
* ``"mean_logits"`` (:func:`mean_logits`): average member logits, then softmax (nnU-Net KD forks
  that average fold logits); sharpens differently from probability averaging.
* ``"adaptive"`` (:func:`adaptive_probabilities`): per-voxel confidence weights over members
  times optional per-member weights, e.g. from validation Dice (prostate multi-teacher paper).

A fourth target is a loss, not a distribution: :class:`MeanMemberKLLoss` averages per-member KL
terms, which differs from the KL to the averaged distribution by a (non-negative) diversity term.

The combination functions are differentiable and do not detach (detach teacher outputs before
calling them when they are targets); :class:`MeanMemberKLLoss` detaches the members itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkd.losses.logits import _masked_voxel_mean, check_logit_pair

__all__ = [
    "COMBINATION_RULES",
    "MeanMemberKLLoss",
    "adaptive_probabilities",
    "check_member_stack",
    "combine",
    "confidence_weights",
    "dice_member_weights",
    "mean_logits",
    "mean_probabilities",
    "normalised_member_weights",
    "target_logits",
    "member_uncertainty",
    "voxel_uncertainty",
]

COMBINATION_RULES: tuple[str, ...] = ("mean_prob", "mean_logits", "adaptive")

MemberWeights = Sequence[float] | torch.Tensor | None


def check_member_stack(members: torch.Tensor, name: str = "member logits") -> None:
    """Raise unless ``members`` is an ``(M, B, C, *spatial)`` tensor (ndim 5 or 6, ``M >= 1``) without NaN."""
    if not isinstance(members, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(members).__name__}.")
    if members.ndim not in (5, 6):
        raise ValueError(
            f"{name} must be stacked as (M, B, C, H, W) or (M, B, C, D, H, W), got shape {tuple(members.shape)}; "
            "stack the per-member (B, C, *spatial) outputs with torch.stack(outputs, dim=0)."
        )
    if members.shape[0] < 1 or members.shape[2] < 1:
        raise ValueError(f"{name} need at least one member and one class, got shape {tuple(members.shape)}.")
    if not members.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {members.dtype}.")
    if torch.isnan(members).any():
        raise ValueError(f"{name} contain NaN.")


def _check_temperature(value: float, name: str = "temperature") -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return float(value)


def normalised_member_weights(
    member_weights: MemberWeights, num_members: int, like: torch.Tensor
) -> torch.Tensor:
    """Per-member weights ``(M,)`` normalised to sum to one (uniform when ``None``), on ``like``'s dtype/device."""
    if member_weights is None:
        return torch.full((num_members,), 1.0 / num_members, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(member_weights, dtype=like.dtype, device=like.device).detach()
    if w.ndim != 1 or w.numel() != num_members:
        raise ValueError(
            f"member_weights must hold one weight per member ({num_members}), got shape {tuple(w.shape)}."
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"member_weights must be finite, got {w.tolist()}.")
    if (w < 0).any():
        raise ValueError(f"member_weights must be non-negative, got {w.tolist()}.")
    total = w.sum()
    if total <= 0:
        raise ValueError("member_weights must not all be zero.")
    return w / total


def _broadcast_members(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(M,)`` -> ``(M, 1, 1, ...)`` broadcastable against an ``ndim``-dimensional member stack."""
    return w.reshape((-1,) + (1,) * (ndim - 1))


def mean_probabilities(
    logits: torch.Tensor, temperature: float = 1.0, member_weights: MemberWeights = None
) -> torch.Tensor:
    r"""Average of member probabilities (ensemble paper).

    ``p_c(x) = sum_m w_m softmax(z_m(x) / T)_c`` with ``w_m >= 0`` normalised to ``sum_m w_m = 1``
    (uniform ``1 / M`` by default). A convex combination of distributions, hence a distribution.

    Args:
        logits: member logits ``(M, B, C, *spatial)``.
        temperature: ``T > 0`` applied to every member before the softmax.
        member_weights: optional ``M`` non-negative weights (e.g. :func:`dice_member_weights`),
            normalised here.

    Returns:
        probabilities ``(B, C, *spatial)``.
    """
    check_member_stack(logits)
    t = _check_temperature(temperature)
    w = normalised_member_weights(member_weights, logits.shape[0], logits)
    probs = torch.softmax(logits / t, dim=2)
    return (_broadcast_members(w, probs.ndim) * probs).sum(dim=0)


def mean_logits(
    logits: torch.Tensor, temperature: float = 1.0, member_weights: MemberWeights = None
) -> torch.Tensor:
    r"""Softmax of averaged member logits (nnU-Net KD forks average fold logits).

    ``p(x) = softmax(sum_m w_m z_m(x) / T)`` with normalised ``w`` (uniform by default).

    This is a normalised weighted *geometric* mean of the member distributions
    (``p_c ∝ prod_m softmax(z_m / T)_c^{w_m}``), not the arithmetic mean (mixture) of
    :func:`mean_probabilities`, and it sharpens differently: the mixture's entropy is at least
    the members' mean entropy and it keeps mass on every class that some member predicts, while
    the geometric mean suppresses classes that any member rules out and is usually sharper (two
    members preferring class 0 with logit gaps 4 and 0 give ``p_0 = 0.88`` by logit averaging
    but ``0.74`` by probability averaging); a member with large logits dominates the average.
    The two coincide when all members agree (or ``M = 1``).

    Args:
        logits: member logits ``(M, B, C, *spatial)``.
        temperature: ``T > 0`` applied to the averaged logits.
        member_weights: optional ``M`` non-negative weights, normalised here.

    Returns:
        probabilities ``(B, C, *spatial)``.
    """
    check_member_stack(logits)
    t = _check_temperature(temperature)
    w = normalised_member_weights(member_weights, logits.shape[0], logits)
    mean = (_broadcast_members(w, logits.ndim) * logits).sum(dim=0)
    return torch.softmax(mean / t, dim=1)


def member_uncertainty(probs_per_member: torch.Tensor) -> torch.Tensor:
    r"""Per-class disagreement between members: population std over the member axis.

    ``u_c(x) = sqrt(mean_m (p_m,c(x) - pbar_c(x))^2)`` with ``pbar = mean_m p_m`` (divisor ``M``,
    not ``M - 1``; zero for a single member).

    Args:
        probs_per_member: member probabilities ``(M, B, C, *spatial)`` (e.g. ``softmax(logits, 2)``).

    Returns:
        ``(B, C, *spatial)``, each entry in ``[0, 0.5]`` for probabilities.
    """
    check_member_stack(probs_per_member, "member probabilities")
    return probs_per_member.std(dim=0, unbiased=False)


def voxel_uncertainty(probs_per_member: torch.Tensor) -> torch.Tensor:
    r"""One uncertainty value per voxel: mean over classes of :func:`member_uncertainty`.

    ``u(x) = mean_c std_m p_m,c(x)``; this is the map written beside an ensemble segmentation.

    Args:
        probs_per_member: member probabilities ``(M, B, C, *spatial)``.

    Returns:
        ``(B, 1, *spatial)``.
    """
    return member_uncertainty(probs_per_member).mean(dim=1, keepdim=True)


def confidence_weights(
    logits: torch.Tensor, temperature_w: float = 1.0, member_weights: MemberWeights = None
) -> torch.Tensor:
    r"""Per-voxel adaptive member weights from confidence (adaptive multi-teacher, prostate paper).

    Confidence of member ``m`` at voxel ``x`` is its negative entropy at ``T = 1``:
    ``conf_m(x) = sum_c p_m,c log p_m,c`` with ``p_m = softmax(z_m)`` (``0`` for a one-hot
    prediction, ``-log C`` for a uniform one). The weights are a softmax over members

    ``a_m(x) = softmax_m(conf_m(x) / T_w + log w_m) = w_m exp(conf_m / T_w) / sum_k w_k exp(conf_k / T_w)``

    with optional per-member weights ``w_m`` (e.g. validation Dice; uniform by default, a member
    with ``w_m = 0`` gets zero weight everywhere). They sum to one over members at every voxel and
    favour the more confident member; smaller ``T_w`` makes the choice harder, ``T_w -> inf``
    gives ``w``.

    Args:
        logits: member logits ``(M, B, C, *spatial)``.
        temperature_w: ``T_w > 0``.
        member_weights: optional ``M`` non-negative weights, normalised here.

    Returns:
        weights ``(M, B, 1, *spatial)``.
    """
    check_member_stack(logits)
    tw = _check_temperature(temperature_w, "temperature_w")
    w = normalised_member_weights(member_weights, logits.shape[0], logits)
    log_p = F.log_softmax(logits, dim=2)
    confidence = (log_p.exp() * log_p).sum(dim=2, keepdim=True)  # (M, B, 1, *spatial), <= 0
    score = confidence / tw + _broadcast_members(w.log(), confidence.ndim)  # log 0 = -inf -> weight 0
    return torch.softmax(score, dim=0)


def dice_member_weights(
    val_dice: Sequence[float] | torch.Tensor, power: float = 1.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    r"""Per-member weights from validation Dice: ``w_m = d_m^power / sum_k d_k^power``.

    ``power > 1`` favours the best members more, ``power = 0`` gives uniform weights
    (``0^0 = 1``).

    Args:
        val_dice: one Dice score in ``[0, 1]`` per member, not all zero.
        power: exponent ``>= 0``.
        dtype: result dtype (default: torch's default float dtype).

    Returns:
        weights ``(M,)`` summing to one.
    """
    d = torch.as_tensor(val_dice, dtype=dtype or torch.get_default_dtype()).detach()
    if d.ndim != 1 or d.numel() < 1:
        raise ValueError(
            f"val_dice must be a non-empty 1D sequence (one score per member), got shape {tuple(d.shape)}."
        )
    if not torch.isfinite(d).all() or (d < 0).any() or (d > 1).any():
        raise ValueError(f"val_dice scores must lie in [0, 1], got {d.tolist()}.")
    if not (power >= 0 and power < float("inf")):
        raise ValueError(f"power must be a finite number >= 0, got {power}.")
    powered = d.pow(float(power))
    total = powered.sum()
    if total <= 0:
        raise ValueError(f"val_dice must not all be zero, got {d.tolist()}.")
    return powered / total


def adaptive_probabilities(
    logits: torch.Tensor,
    temperature: float = 1.0,
    temperature_w: float = 1.0,
    member_weights: MemberWeights = None,
) -> torch.Tensor:
    r"""Confidence-weighted average of member probabilities (adaptive multi-teacher).

    ``p(x) = sum_m a_m(x) softmax(z_m(x) / T)`` with ``a`` from :func:`confidence_weights`
    (confidence measured at ``T = 1``, weights at ``T_w``, optional per-member ``w_m``). Per voxel
    a convex combination of distributions, hence a distribution.

    Args:
        logits: member logits ``(M, B, C, *spatial)``.
        temperature: ``T > 0`` softening the member distributions that are averaged.
        temperature_w: ``T_w > 0`` of the confidence weights.
        member_weights: optional ``M`` non-negative weights (e.g. :func:`dice_member_weights`).

    Returns:
        probabilities ``(B, C, *spatial)``.
    """
    a = confidence_weights(logits, temperature_w=temperature_w, member_weights=member_weights)
    t = _check_temperature(temperature)
    return (a * torch.softmax(logits / t, dim=2)).sum(dim=0)


_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "mean_prob": mean_probabilities,
    "mean_logits": mean_logits,
    "adaptive": adaptive_probabilities,
}


def combine(rule: str, logits: torch.Tensor, **options) -> torch.Tensor:
    """Combine member logits ``(M, B, C, *spatial)`` into probabilities ``(B, C, *spatial)`` by ``rule``.

    Rules (:data:`COMBINATION_RULES`): ``"mean_prob"`` -> :func:`mean_probabilities`,
    ``"mean_logits"`` -> :func:`mean_logits`, ``"adaptive"`` -> :func:`adaptive_probabilities`.
    ``options`` (``temperature``, ``member_weights``, and ``temperature_w`` for ``"adaptive"``)
    are passed on; an option the rule does not take raises ``TypeError``.
    """
    if rule not in _RULES:
        raise ValueError(f"unknown combination rule {rule!r}; valid rules: {', '.join(COMBINATION_RULES)}.")
    return _RULES[rule](logits, **options)


def target_logits(rule: str, logits: torch.Tensor, temperature: float = 1.0, **options) -> torch.Tensor:
    r"""A logit tensor ``g`` (B, C, *spatial) whose tempered softmax is the combined target.

    Logit losses compare ``softmax(z_s / T)`` with ``softmax(g / T)``; ``g`` is chosen so that
    ``softmax(g / T)`` equals the rule's combined distribution at that ``T``:

    * one member (any rule), or ``"mean_logits"``: ``g = sum_m w_m z_m`` (the (mean) logits themselves; exact at
      every ``T`` and for spatial softmaxes such as CWD);
    * ``"mean_prob"`` / ``"adaptive"``: ``g = T log p_T`` with ``p_T`` = :func:`combine` at ``T``
      (exact for the class softmax at this ``T`` only; probabilities are clamped at ``1e-12``
      so ``g`` stays finite).

    Args:
        rule: one of :data:`COMBINATION_RULES`.
        logits: member logits ``(M, B, C, *spatial)``.
        temperature: the ``T`` of the loss that will consume ``g``.
        options: ``member_weights`` and, for ``"adaptive"``, ``temperature_w``.
    """
    check_member_stack(logits)
    t = _check_temperature(temperature)
    if logits.shape[0] == 1 or rule == "mean_logits":
        w = normalised_member_weights(options.get("member_weights"), logits.shape[0], logits)
        return (_broadcast_members(w, logits.ndim) * logits).sum(dim=0)
    probs = combine(rule, logits, temperature=t, **options)
    return t * probs.clamp_min(1e-12).log()


class MeanMemberKLLoss(nn.Module):
    r"""Mean over members of the temperature-scaled per-member KL, averaged over voxels.

    ``loss = T^2 * mean_voxels mean_m KL(p_m || p_s)`` with ``p_m = softmax(z_m / T)``,
    ``p_s = softmax(z_s / T)`` and ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` per voxel.

    This is *not* the KL to the averaged distribution ``pbar = mean_m p_m``. The identity (exact,
    per voxel, for any ``q``)

    ``mean_m KL(p_m || q) = KL(pbar || q) + mean_m KL(p_m || pbar)``

    follows from ``log(p_m / q) = log(p_m / pbar) + log(pbar / q)`` and
    ``mean_m sum_c p_m,c log(pbar_c / q_c) = sum_c pbar_c log(pbar_c / q_c)``. The second term is
    the generalised Jensen-Shannon divergence of the members: it does not depend on the student
    (same gradient as KL to :func:`mean_probabilities` with ``T``), but the loss value carries the
    members' disagreement and never reaches zero unless all members agree.

    Args:
        temperature: ``T > 0``.

    Shapes: ``student_logits (B, C, *spatial)``, ``member_logits (M, B, C, *spatial)``, optional
    ``mask`` as in :class:`medkd.losses.logits.KLDivergenceLoss` -> scalar. Members are detached.
    """

    inputs = "logits"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(
        self, student_logits: torch.Tensor, member_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_member_stack(member_logits)
        if member_logits.shape[1:] != student_logits.shape:
            raise ValueError(
                f"member logits {tuple(member_logits.shape)} must be (M, *student shape) with student "
                f"{tuple(student_logits.shape)}; resample members to the student's grid first."
            )
        check_logit_pair(student_logits, member_logits[0])
        t = self.temperature
        log_pm = F.log_softmax(member_logits.detach() / t, dim=2)
        log_ps = F.log_softmax(student_logits / t, dim=1).unsqueeze(0)
        kl = (log_pm.exp() * (log_pm - log_ps)).sum(dim=2, keepdim=True).mean(dim=0)  # (B, 1, *spatial)
        return t * t * _masked_voxel_mean(kl, mask)
