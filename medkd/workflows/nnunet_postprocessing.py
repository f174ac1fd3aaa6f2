"""nnU-Net v2's post-processing decision (``postprocessing.pkl`` / ``.json``) as a teacher set's own decision.

nnU-Net decides its post-processing on the cross-validation predictions
(``nnUNetv2_find_best_configuration`` -> ``crossval_results_folds_0_1_2_3_4/postprocessing.pkl``, with a
readable ``postprocessing.json`` beside it) and applies it with ``nnUNetv2_apply_postprocessing``. Each
step is ``remove_all_but_largest_component_from_segmentation(seg, labels_or_regions=...)``: first, when it
helped, all foreground labels as one (a list), then single labels (ints). That is the rule medkd decides
by itself (:mod:`medkd.engine.postprocess`, same full connectivity), so a decision converts one to one:
the list step becomes ``foreground_as_one``, each int step an applied class.

The pickle is read without running code from it: the only global it may name is nnU-Net's
``remove_all_but_largest_component_from_segmentation`` (plus numpy's scalar constructors); anything else
is refused naming the file. Region-based steps (tuples) are refused, as region-based models are.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medkd.engine.postprocess import CONNECTIVITY, Postprocessing

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

__all__ = ["NNUNET_STEP", "NnunetPostprocessingError", "find_nnunet_postprocessing", "nnunet_postprocessing_record",
           "read_nnunet_steps"]

NNUNET_STEP = "remove_all_but_largest_component_from_segmentation"
_STEP_MODULE = "nnunetv2.postprocessing.remove_connected_components"
_NUMPY_GLOBALS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


class NnunetPostprocessingError(ValueError):
    """A post-processing file of nnU-Net that medkd cannot read or apply; the message names the file."""


class _StepUnpickler(pickle.Unpickler):
    """Unpickles nnU-Net's ``(pp_fns, pp_fn_kwargs)``; a function global becomes its name, nothing runs."""

    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (_STEP_MODULE, NNUNET_STEP):
            return NNUNET_STEP
        if (module, name) in _NUMPY_GLOBALS:
            return np.dtype if name == "dtype" else _numpy_scalar
        raise NnunetPostprocessingError(f"{self.source}: refers to {module}.{name}, which is not nnU-Net's "
                                        f"{NNUNET_STEP}; medkd does not run code from a pickle")


def _labels(value: Any, source: Path) -> int | list[int]:
    if isinstance(value, list):
        return [_labels(v, source) for v in value]  # type: ignore[misc]
    if isinstance(value, tuple):
        raise NnunetPostprocessingError(f"{source}: region-based post-processing ({value}) is not supported")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise NnunetPostprocessingError(f"{source}: labels_or_regions {value!r} is not a label or a list of labels")


def _steps(names: Sequence[Any], kwargs: Sequence[Any], source: Path) -> list[int | list[int]]:
    if not isinstance(names, (list, tuple)) or not isinstance(kwargs, (list, tuple)) or len(names) != len(kwargs):
        raise NnunetPostprocessingError(f"{source}: expected two lists of equal length (functions, their kwargs)")
    steps = []
    for index, (name, options) in enumerate(zip(names, kwargs)):
        if name != NNUNET_STEP:
            raise NnunetPostprocessingError(f"{source}: step {index} is {name!r}; only {NNUNET_STEP} is supported")
        if not isinstance(options, dict) or set(options) - {"labels_or_regions", "background_label"} \
                or options.get("background_label", 0) != 0 or "labels_or_regions" not in options:
            raise NnunetPostprocessingError(f"{source}: step {index} kwargs {options!r}: expected only "
                                            "labels_or_regions (and background_label 0)")
        steps.append(_labels(options["labels_or_regions"], source))
    return steps


def read_nnunet_steps(path: str | Path) -> list[int | list[int]]:
    """The steps of an nnU-Net post-processing file, in order: a list of labels (kept as one) or one label.

    ``path`` is ``postprocessing.pkl`` or nnU-Net's ``postprocessing.json`` (``postprocessing_fns`` /
    ``postprocessing_kwargs``).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise NnunetPostprocessingError(f"cannot read {path}: {err.strerror or err}") from None
    if path.suffix == ".json":
        try:
            record = json.loads(data)
            return _steps(record["postprocessing_fns"], record["postprocessing_kwargs"], path)
        except (ValueError, KeyError, TypeError) as err:
            if isinstance(err, NnunetPostprocessingError):
                raise
            raise NnunetPostprocessingError(f"{path}: not nnU-Net's postprocessing.json ({type(err).__name__}: "
                                            f"{err}); expected keys postprocessing_fns, postprocessing_kwargs") from None
    try:
        loaded = _StepUnpickler(data, path).load()
    except NnunetPostprocessingError:
        raise
    except Exception as err:  # a damaged or foreign pickle: say which file
        raise NnunetPostprocessingError(f"{path}: not a readable nnU-Net postprocessing.pkl "
                                        f"({type(err).__name__}: {err})") from None
    if not isinstance(loaded, tuple) or len(loaded) != 2:
        raise NnunetPostprocessingError(f"{path}: expected the pair (functions, kwargs) nnU-Net writes")
    return _steps(*loaded, path)


def find_nnunet_postprocessing(results_dir: str | Path, folds: Sequence[int | str]) -> Path | None:
    """nnU-Net's decision for ``folds``: ``crossval_results_folds_<folds>/postprocessing.pkl`` (or the
    folder's own ``postprocessing.pkl``, as an exported model holds it); ``None`` when there is none."""
    results_dir = Path(results_dir)
    tag = "_".join(str(f) for f in folds)
    for path in (results_dir / f"crossval_results_folds_{tag}" / "postprocessing.pkl",
                 results_dir / "postprocessing.pkl"):
        if path.is_file():
            return path
    return None


def nnunet_postprocessing_record(steps: Sequence[int | list[int]], labels: Mapping[str, int],
                                 members: list[list[Any]], source: Path) -> dict[str, Any]:
    """A medkd set decision record (:func:`medkd.engine.postprocess.read_postprocessing`) of nnU-Net's steps.

    A list step must be every foreground label and come first (nnU-Net's order); int steps must be
    foreground labels of ``labels``. Validation Dice values are not known here (``None``).
    """
    foreground = {name: value for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value != 0}
    values = set(foreground.values())
    merged, single = False, set()
    for index, step in enumerate(steps):
        if isinstance(step, list):
            if index != 0 or set(step) != values:
                raise NnunetPostprocessingError(f"{source}: step {index} keeps {step} as one; medkd applies that "
                                                f"only as the first step, over all foreground labels {sorted(values)}")
            merged = True
        elif step not in values:
            raise NnunetPostprocessingError(f"{source}: step {index} names label {step}, not a foreground label "
                                            f"of dataset.json {foreground}")
        else:
            single.add(step)
    record = {"members": members, "source": {"nnunet_postprocessing": str(source)}, "num_cases": None,
              "connectivity": CONNECTIVITY,
              "foreground_as_one": {"applied": merged, "dice_without": None, "dice_with": None},
              "classes": {name: {"label": value, "applied": value in single, "dice_without": None, "dice_with": None}
                          for name, value in foreground.items()}}
    Postprocessing.from_record(record, str(source))
    return record
