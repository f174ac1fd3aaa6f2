r"""Prediction with a teacher set: an ensemble is a model.

:class:`EnsemblePredictor` has the interface of :class:`medkd.engine.inference.Predictor`
(``predict_arrays``, ``predict_files``, ``segment``, ``labels``, ``num_channels``), so
``predict_folder`` and ``medkd predict`` take a teacher set wherever they take one checkpoint;
:func:`load_predictor` picks the right one for a path.

Each member predicts with its own network, patch size and preprocessing plan (whole 2D slices or
sliding window, as its run did unless ``whole_slice`` says otherwise, and flip TTA whose mean is
the member's probability), and its probabilities are mapped back to the
image's original grid before they are combined, as nnU-Net does when it ensembles configurations.
Members may therefore differ in architecture, patch size, 2D/3D mode or normalisation statistics;
they must share the labels (and so the number of classes) and the input channels.

Post-processing: a member's ``postprocessing.json`` was decided on that member's own validation
predictions, not on the combined ones, so it is never applied to the ensemble. As nnU-Net does for an
ensemble, the set has its own decision, made on the combined predictions of the validation cases
(:func:`medkd.engine.validation.decide_set_postprocessing`, written beside ``teachers.json`` at the
end of ``train-teachers`` or by ``medkd postprocess --run-dir SET``); it is applied only while it
names the set's current members (checkpoint file and step), otherwise the argmax is used.

Combination rules for member probabilities ``p_m`` ``(K, *spatial)``, ``m = 1..M``:

* ``"mean_prob"`` (default, ensemble paper): ``p = (1/M) sum_m p_m``.
* ``"mean_logits"``: ``p = softmax((1/M) sum_m z_m)``. Taking ``z_m = log p_m`` is exact: the
  log-softmax ``log p_m = z_m - logsumexp(z_m)`` shifts all classes of a voxel by the same amount,
  so the mean shifts by a constant and the softmax does not change. With TTA (or after mapping back
  to the original grid, which interpolates probabilities) ``p_m`` is the member's averaged
  probability, so ``log p_m`` is the logit of that averaged prediction. Probabilities are clamped
  at the smallest normal float32 (``~1.2e-38``) before the log so that no ``-inf`` enters the sum.

Uncertainty, one value per voxel on the original grid: ``u(x) = mean_c std_m p_m,c(x)`` with the
population std (divisor ``M``), i.e. :func:`medkd.teachers.combine.voxel_uncertainty` of the
stacked member probabilities, whichever rule combines them.

Memory does not grow with ``M``: member probabilities are folded one at a time into running
statistics (:class:`MemberStatistics`): Welford's running mean and sum of squared deviations
(which, unlike ``sum p^2 - M pbar^2``, is exactly zero when members agree) and, for
``"mean_logits"``, the running sum of ``log p_m``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from medkd.data.io import Geometry
from medkd.engine.inference import CaseSegmenter, Predictor, read_case
from medkd.engine.postprocess import POSTPROCESSING_FILE, Postprocessing, read_postprocessing
from medkd.teachers.manifest import ManifestError, TeacherSet, is_manifest, load_manifest, open_teachers

__all__ = ["ENSEMBLE_RULES", "EnsemblePredictor", "MemberStatistics", "load_predictor"]

#: How ``medkd predict`` combines the members of a teacher set.
ENSEMBLE_RULES: tuple[str, ...] = ("mean_prob", "mean_logits")

_TINY = torch.finfo(torch.float32).tiny
log = logging.getLogger(__name__)


def set_postprocessing_path(teachers: TeacherSet) -> Path:
    """Where a teacher set's own post-processing decision lives: ``postprocessing.json`` beside its manifest."""
    return Path(teachers.source).parent / POSTPROCESSING_FILE


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`ENSEMBLE_RULES`, else a ``ValueError`` listing them."""
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"unknown combination rule {rule!r}; choose one of {', '.join(ENSEMBLE_RULES)}")
    return rule


class MemberStatistics:
    r"""Running statistics over members of per-member probabilities ``(K, *spatial)``.

    After :meth:`add` has been called with ``p_1 .. p_M``:

    * :meth:`mean_probabilities` is ``(1/M) sum_m p_m`` (Welford running mean);
    * :meth:`mean_logit_probabilities` is ``softmax_K((1/M) sum_m log max(p_m, tiny))``;
    * :meth:`voxel_uncertainty` is ``mean_c sqrt((1/M) sum_m (p_m,c - pbar_c)^2)`` ``(*spatial)``.

    Only what the requested outputs need is kept: at most three volumes of shape ``(K, *spatial)``
    whatever ``M``.

    Args:
        rule: ``"mean_prob"`` or ``"mean_logits"``.
        spread: also track the sum of squared deviations for :meth:`voxel_uncertainty`.
    """

    def __init__(self, rule: str = "mean_prob", spread: bool = False) -> None:
        self.rule, self.spread = check_rule(rule), spread
        self.count = 0
        self._shape: tuple[int, ...] = ()
        self._mean: torch.Tensor | None = None  # Welford running mean
        self._m2: torch.Tensor | None = None  # Welford sum of squared deviations
        self._log_sum: torch.Tensor | None = None

    def add(self, probabilities: np.ndarray | torch.Tensor) -> None:
        """Fold in one member's probabilities ``(K, *spatial)`` (same shape for every member)."""
        p = torch.as_tensor(probabilities, dtype=torch.float32)
        if self.count and p.shape != self._shape:
            raise ValueError(f"member probabilities have shape {tuple(p.shape)}, earlier members {self._shape}")
        self.count += 1
        self._shape = tuple(p.shape)
        if self.rule == "mean_logits":
            log_p = p.clamp_min(_TINY).log()
            self._log_sum = log_p if self._log_sum is None else self._log_sum.add_(log_p)
        if self.rule == "mean_prob" or self.spread:
            if self._mean is None:
                self._mean = p.clone()
                self._m2 = torch.zeros_like(p) if self.spread else None
            else:
                delta = p - self._mean
                self._mean.add_(delta / self.count)
                if self._m2 is not None:
                    self._m2.add_(delta * (p - self._mean))

    def _require(self, what: str, ready: bool) -> None:
        if not self.count:
            raise ValueError("no member probabilities were added")
        if not ready:
            raise ValueError(f"{what} was not tracked (rule={self.rule!r}, spread={self.spread})")

    def mean_probabilities(self) -> torch.Tensor:
        """``(1/M) sum_m p_m``, ``(K, *spatial)``."""
        self._require("the mean probability", self._mean is not None)
        return self._mean

    def mean_logit_probabilities(self) -> torch.Tensor:
        """``softmax_K((1/M) sum_m log p_m)``, ``(K, *spatial)`` (= softmax of the averaged logits)."""
        self._require("the sum of log-probabilities", self._log_sum is not None)
        return torch.softmax(self._log_sum / self.count, dim=0)

    def combined(self) -> torch.Tensor:
        """The combined probabilities ``(K, *spatial)`` of this statistics' rule."""
        return self.mean_probabilities() if self.rule == "mean_prob" else self.mean_logit_probabilities()

    def voxel_uncertainty(self) -> torch.Tensor:
        """``mean_c std_m p_m,c`` (population std), ``(*spatial)``; zero where all members agree."""
        self._require("the member spread", self._m2 is not None)
        return (self._m2 / self.count).clamp_min_(0).sqrt_().mean(dim=0)


class EnsemblePredictor(CaseSegmenter):
    """A teacher set predicting as one model: members' probabilities on the original grid, combined.

    Args:
        teachers: a :class:`~medkd.teachers.manifest.TeacherSet`, or a path that
            :func:`~medkd.teachers.manifest.open_teachers` accepts (``teachers.json``, its folder, a
            checkpoint).
        device, tta, amp, whole_slice: as for :class:`~medkd.engine.inference.Predictor`, for every member.
        combine: ``"mean_prob"`` or ``"mean_logits"`` (see the module docstring).

    All member networks are loaded once and kept (so a folder of cases loads each checkpoint once).

    Raises:
        ValueError: a member's labels differ from the set's, or its input channels from the first
            member's; the message names the member and its checkpoint.
    """

    def __init__(self, teachers: TeacherSet | str | Path, device: str = "cpu", tta: bool = False,
                 amp: bool = False, combine: str = "mean_prob", whole_slice: bool | None = None,
                 postprocess: bool = True) -> None:
        self.teachers = teachers if isinstance(teachers, TeacherSet) else open_teachers(teachers)
        self.combine = check_rule(combine)
        self.labels: dict[str, int] = dict(self.teachers.labels)
        self.members = [Predictor(m.checkpoint, device=device, tta=tta, amp=amp, whole_slice=whole_slice,
                                  postprocess=False) for m in self.teachers.members]
        for member, predictor in zip(self.teachers.members, self.members):
            self._check_member(member.name, predictor)
        self._plan_keys = [p.plan.fingerprint() for p in self.members]
        self.postprocessing: Postprocessing | None = self._set_postprocessing() if postprocess else None

    @property
    def member_keys(self) -> list[list[Any]]:
        """``[name, checkpoint file, step]`` per member: what a set's post-processing decision was made for."""
        return [[m.name, m.checkpoint.name, p.step] for m, p in zip(self.teachers.members, self.members)]

    def _set_postprocessing(self) -> Postprocessing | None:
        path = set_postprocessing_path(self.teachers)
        if Path(self.teachers.source).suffix != ".json" or not path.is_file():  # not a set: no set decision
            return None
        record = read_postprocessing(path)
        if record.get("members") != self.member_keys:
            log.warning("%s was decided for other members (%s); not applied", path, record.get("members"))
            return None
        return Postprocessing.from_record(record, str(path))

    def _check_member(self, name: str, member: Predictor) -> None:
        where = f"{self.teachers.source}: member {name!r} ({member.checkpoint})"
        if dict(member.labels) != self.labels:
            raise ValueError(f"{where} has labels {member.labels}, but the teacher set has {self.labels}; "
                             "all members of an ensemble must predict the same labels")
        first = self.members[0]
        if member.num_channels != first.num_channels:
            raise ValueError(f"{where} takes {member.num_channels} input channel(s), but member "
                             f"{self.teachers.members[0].name!r} ({first.checkpoint}) takes {first.num_channels}")

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_channels(self) -> int:
        return self.members[0].num_channels

    @property
    def source(self) -> Path:
        """The manifest (or single checkpoint) the set was read from."""
        return self.teachers.source

    def member_probabilities(self, image: np.ndarray, geometry: Geometry) -> Iterator[np.ndarray]:
        """Each member's probabilities ``(K, *spatial)`` on the grid of ``image`` ``(C, *spatial)``, in member order.

        Consecutive members with the same preprocessing plan share one preprocessed image.
        """
        self.members[0].check_image(image)
        key, prepared, props = None, None, None
        for name, member, plan_key in zip((m.name for m in self.teachers.members), self.members, self._plan_keys):
            if plan_key != key:
                try:
                    prepared, props = member.prepare(image, geometry)
                except ValueError as err:
                    raise ValueError(f"member {name!r} ({member.checkpoint}): {err}") from None
                key = plan_key
            yield member.predict_prepared(prepared, props, image.shape[1:])

    def _statistics(self, image: np.ndarray, geometry: Geometry, spread: bool) -> MemberStatistics:
        stats = MemberStatistics(self.combine, spread=spread)
        for probs in self.member_probabilities(image, geometry):
            stats.add(probs)
        return stats

    def predict_arrays(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Combined probabilities ``(K, *spatial)`` on the grid of ``image`` ``(C, *spatial)`` as read from disk."""
        return self._statistics(image, geometry, spread=False).combined().numpy()

    def predict_with_uncertainty(self, image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """Combined probabilities ``(K, *spatial)`` and the voxel uncertainty ``(*spatial)`` float32."""
        stats = self._statistics(image, geometry, spread=True)
        return stats.combined().numpy(), stats.voxel_uncertainty().numpy()

    def predict_files(self, image_files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """Segmentation and combined probabilities for one case given its channel files."""
        image, geometry = read_case(image_files)
        probs = self.predict_arrays(image, geometry)
        return self.segment(probs), probs, geometry


def load_predictor(path: str | Path, *, device: str = "cpu", tta: bool = False, amp: bool = False,
                   combine: str = "mean_prob", whole_slice: bool | None = None,
                   postprocess: bool = True) -> Predictor | EnsemblePredictor:
    """A :class:`Predictor` for one checkpoint, an :class:`EnsemblePredictor` for a teacher set.

    ``path`` is a checkpoint (``best.pt``), a ``teachers.json`` or a folder holding one. A single
    checkpoint predicts exactly as before (``combine`` is checked but has nothing to combine) and
    applies its ``postprocessing.json`` unless ``postprocess=False``; so does a teacher set, with the
    decision made for the set (module docstring). ``whole_slice`` (``None``: as each run did) applies to every model.
    """
    check_rule(combine)
    path = Path(path)
    if is_manifest(path):
        return EnsemblePredictor(load_manifest(path), device=device, tta=tta, amp=amp, combine=combine,
                                 whole_slice=whole_slice, postprocess=postprocess)
    if not path.is_file():
        raise ManifestError(f"model not found: {path} (expected a checkpoint .pt, a teachers.json or a folder "
                            "holding one)")
    return Predictor(path, device=device, tta=tta, amp=amp, whole_slice=whole_slice, postprocess=postprocess)
