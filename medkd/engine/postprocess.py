"""nnU-Net-style post-processing: keep only the largest connected component where validation says it helps.

Operation (:func:`keep_largest_component`): among the voxels of a set of labels, find connected
components with full connectivity (8-neighbourhood in 2D, 26 in 3D, as nnU-Net v2) over the whole
label map, keep the largest and set the others to background (0). A volume is always processed as
a volume, also for a 2D-mode model (as nnU-Net does for its 2D configuration): a structure that
continues from slice to slice is one component. Native 2D images use 2D connectivity.

Decision (:func:`decide_postprocessing`, nnU-Net's rule), on a model's predictions of its
validation cases:

1. *all foreground as one*: keep the largest component of the union of all foreground labels if
   that strictly raises the mean foreground Dice (mean over classes of the case-mean Dice);
2. then *per class* ``c``, starting from the result of step 1: keep the largest component of
   class ``c`` if that strictly raises the case-mean Dice of class ``c``. A step that changes
   nothing, or a class absent from every case (NaN Dice), is not applied.

The record (``postprocessing.json`` beside ``best.pt``) lists every step with ``applied`` and the
validation Dice without and with it; :class:`Postprocessing` is the part needed to apply it.
Probabilities are never post-processed, only label maps.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medkd.storage import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["POSTPROCESSING_FILE", "Postprocessing", "class_dice", "decide_postprocessing", "keep_largest_component",
           "postprocessing_beside", "read_postprocessing", "write_postprocessing"]

POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSING_FORMAT = "medkd-postprocessing-v1"
CONNECTIVITY = "full (8-neighbourhood in 2D, 26 in 3D), over the whole label map"


def keep_largest_component(segmentation: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """A copy of ``segmentation`` (*spatial, integer labels) where the voxels of ``labels`` outside
    the largest connected component of their union are set to 0. Components tied for the largest
    size are all kept, as nnU-Net v2 keeps them (``acvl_utils``' ``remove_all_but_largest_component``)."""
    mask = np.isin(segmentation, list(labels))
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    out = segmentation.copy()
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (sizes[components] != sizes.max())] = 0
    return out


def class_dice(segmentation: np.ndarray, reference: np.ndarray, label: int) -> float:
    """Dice of ``label`` between two label maps of one shape; NaN when the label is absent from both."""
    pred, ref = segmentation == label, reference == label
    total = int(pred.sum()) + int(ref.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _mean_dice(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray], label: int) -> float:
    with warnings.catch_warnings():  # all-NaN (class absent everywhere) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean([class_dice(p, r, label) for p, r in zip(predictions, references)] or [math.nan]))


def _mean_over_classes(per_class: Mapping[int, float]) -> float:
    finite = [d for d in per_class.values() if not math.isnan(d)]
    return float(np.mean(finite)) if finite else math.nan


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def decide_postprocessing(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
                          labels: Mapping[str, int]) -> dict[str, Any]:
    """The decision record for label maps ``predictions`` vs ``references`` (pairs of one shape).

    ``labels`` maps class names to values (background 0 is skipped). Returns a JSON-ready dict:
    ``{"num_cases", "connectivity", "foreground_as_one": {"applied", "dice_without", "dice_with"},
    "classes": {name: {"label", "applied", "dice_without", "dice_with"}}}``; Dice values are
    validation means (``None`` where NaN), per class measured after step 1 (module docstring).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    classes = {name: value for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value != 0}
    before = {v: _mean_dice(predictions, references, v) for v in classes.values()}
    merged = [keep_largest_component(p, list(classes.values())) for p in predictions]
    after = {v: _mean_dice(merged, references, v) for v in classes.values()}
    fg_before, fg_after = _mean_over_classes(before), _mean_over_classes(after)
    use_merged = fg_after > fg_before
    current, base = (merged, after) if use_merged else (predictions, before)
    record: dict[str, Any] = {
        "num_cases": len(predictions), "connectivity": CONNECTIVITY,
        "foreground_as_one": {"applied": bool(use_merged), "dice_without": _finite(fg_before),
                              "dice_with": _finite(fg_after)},
        "classes": {},
    }
    for name, value in classes.items():
        with_step = _mean_dice([keep_largest_component(p, [value]) for p in current], references, value)
        record["classes"][name] = {"label": value, "applied": bool(with_step > base[value]),
                                   "dice_without": _finite(base[value]), "dice_with": _finite(with_step)}
    return record


@dataclass(frozen=True)
class Postprocessing:
    """The steps to apply, in order: all foreground labels as one (``foreground``), then each of ``classes``."""

    foreground: tuple[int, ...] = ()
    classes: tuple[int, ...] = ()

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str = "<record>") -> "Postprocessing":
        """The applied steps of a decision record; a missing or malformed key is a ``ValueError`` naming it."""
        try:
            classes = record["classes"]
            labels = tuple(int(entry["label"]) for entry in classes.values())
            chosen = tuple(int(entry["label"]) for entry in classes.values() if entry["applied"])
            merged = bool(record["foreground_as_one"]["applied"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{source}: malformed post-processing record ({type(err).__name__}: {err}); "
                             f"expected keys foreground_as_one.applied and classes.<name>.label/applied") from None
        return cls(foreground=labels if merged else (), classes=chosen)

    @property
    def is_identity(self) -> bool:
        """Whether no step is applied."""
        return not self.foreground and not self.classes

    def apply(self, segmentation: np.ndarray) -> np.ndarray:
        """The post-processed label map (*spatial); ``segmentation`` itself is not modified."""
        out = keep_largest_component(segmentation, self.foreground) if self.foreground else segmentation.copy()
        for label in self.classes:
            out = keep_largest_component(out, [label])
        return out


def write_postprocessing(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a decision record (plus the format tag) as JSON, atomically; returns ``path``."""
    path = Path(path)
    atomic_write_text(path, json.dumps({"format": POSTPROCESSING_FORMAT, **record}, indent=1))
    return path


def read_postprocessing(path: str | Path) -> dict[str, Any]:
    """A decision record written by :func:`write_postprocessing`; errors name the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read post-processing decision {path}: {err}") from None
    if not isinstance(record, dict) or record.get("format") != POSTPROCESSING_FORMAT:
        raise ValueError(f"{path} is not a medkd post-processing decision (missing format={POSTPROCESSING_FORMAT!r})")
    Postprocessing.from_record(record, str(path))  # validates the keys
    return record


def postprocessing_beside(checkpoint: str | Path, step: int | None, labels: Mapping[str, int]) -> Postprocessing | None:
    """The decision in ``postprocessing.json`` beside ``checkpoint``, if it was made for this checkpoint.

    ``None`` (with a warning) when the record names another checkpoint file, another training step
    or other labels: it was decided for other weights. ``None`` silently when there is no file.
    """
    checkpoint = Path(checkpoint)
    path = checkpoint.parent / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    record = read_postprocessing(path)
    made_for = (record.get("checkpoint"), record.get("step"))
    if made_for != (checkpoint.name, step) or {n: c["label"] for n, c in record["classes"].items()} != \
            {n: v for n, v in labels.items() if v != 0}:
        log.warning("%s was decided for %s at step %s with classes %s, not for %s (step %s); not applied. "
                    "Run `medkd postprocess --run-dir %s` to decide again.", path, *made_for,
                    list(record["classes"]), checkpoint.name, step, checkpoint.parent)
        return None
    return Postprocessing.from_record(record, str(path))
