"""Run a bundle (``medkd export``) with onnxruntime: ``medkd predict --bundle``, without PyTorch.

:class:`BundlePredictor` has the interface of :class:`medkd.engine.inference.Predictor`, so
:func:`medkd.engine.case_io.predict_folder` drives it the same way: same case naming, same checks,
outputs in the input's format with its exact geometry, post-processing as decided for the exported
checkpoint. The numbers come from :mod:`medkd.deploy.ops` (numpy) and the ONNX network.

This module imports numpy, onnxruntime, SimpleITK (through :mod:`medkd.data.io`), scipy (through
:mod:`medkd.engine.postprocess`) and no PyTorch or MONAI; ``tests/deploy/test_runtime.py`` proves
it by running with ``torch`` and ``monai`` made unimportable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from medkd.data.io import Geometry
from medkd.deploy import ops
from medkd.deploy.bundle import MODEL_FILE, PLAN_FILE, PRECISIONS, BundleError, read_bundle
from medkd.engine.case_io import CaseSegmenter, check_image, predict_folder
from medkd.engine.postprocess import Postprocessing

__all__ = ["BundlePredictor", "predict_with_bundle"]

#: the preprocessing plan version this runtime implements (medkd.data.preprocess.PLAN_VERSION)
PLAN_VERSION = 1


def _check_plan(plan: dict[str, Any], path: Path) -> None:
    """Refuse a plan this runtime cannot honour; the error names ``path`` and the key."""
    pre, inference = plan["preprocessing"], plan["inference"]
    if pre.get("version") != PLAN_VERSION:
        raise BundleError(f"{path}: preprocessing.version {pre.get('version')!r} is not {PLAN_VERSION}; "
                          "export it again with this medkd or use the medkd that made it")
    if pre.get("mode") not in ("2d", "3d"):
        raise BundleError(f"{path}: preprocessing.mode must be '2d' or '3d', got {pre.get('mode')!r}")
    schemes = pre.get("normalization") or []
    if len(schemes) != pre.get("num_channels") or not set(schemes) <= {"zscore", "ct", "none"}:
        raise BundleError(f"{path}: preprocessing.normalization {schemes!r} does not fit num_channels "
                          f"{pre.get('num_channels')!r}")
    precision = plan["model"].get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BundleError(f"{path}: model.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if len(inference.get("patch_size") or []) != (2 if pre["mode"] == "2d" else 3):
        raise BundleError(f"{path}: inference.patch_size {inference.get('patch_size')!r} does not fit "
                          f"mode {pre['mode']}")


class BundlePredictor(CaseSegmenter):
    """A bundle's ONNX network plus its preprocessing and post-processing, on the CPU.

    Any precision of ``medkd export`` (fp32, int8 QDQ, fp16) runs the same way: the network takes
    and returns float32 in all of them.

    Args:
        bundle: folder written by ``medkd export``; every file is checked against ``plan.json``.
        tta: average over all mirrorings of the spatial axes.
        whole_slice: 2D models: whole slices (``True``) or the sliding window (``False``);
            ``None`` follows the exported run.
        postprocess: apply the post-processing exported with the model (``None`` in the plan: argmax only).
        threads: onnxruntime intra-op threads (``None``: onnxruntime's default, all cores).
    """

    num_members = 1

    def __init__(self, bundle: str | Path, tta: bool = False, whole_slice: bool | None = None,
                 postprocess: bool = True, threads: int | None = None):
        self.folder = Path(bundle)
        self.plan = read_bundle(self.folder)
        _check_plan(self.plan, self.folder / PLAN_FILE)
        self.preprocessing: dict[str, Any] = self.plan["preprocessing"]
        self.inference: dict[str, Any] = self.plan["inference"]
        self.labels: dict[str, int] = {name: int(value) for name, value in self.plan["labels"].items()}
        self.tta = tta
        self.whole_slice = bool(self.inference.get("whole_slice")) if whole_slice is None else bool(whole_slice)
        steps = self.plan["postprocessing"]
        self.postprocessing: Postprocessing | None = None if not (postprocess and steps) else \
            Postprocessing(foreground=tuple(steps["foreground"]), classes=tuple(steps["classes"]))
        self.session = _session(self.folder / MODEL_FILE, threads)
        self.input_name = self.plan["model"].get("input", "image")

    @property
    def source(self) -> Path:
        """The bundle folder (named in error messages)."""
        return self.folder

    @property
    def num_channels(self) -> int:
        return int(self.preprocessing["num_channels"])

    def network(self, batch: np.ndarray) -> np.ndarray:
        """Logits (B, K, *spatial) of a batch (B, C, *spatial) float32."""
        return self.session.run(None, {self.input_name: batch})[0]

    def check_image(self, image: np.ndarray) -> None:
        """Raise unless ``image`` (C, *spatial) has the plan's channels and dimensionality and finite voxels."""
        check_image(image, self.num_channels, self.preprocessing["mode"])

    def prepare(self, image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, dict[str, Any]]:
        """The network's input (C, z, y, x) and what maps a prediction back (:func:`medkd.deploy.ops.preprocess`)."""
        return ops.preprocess(image, geometry, self.preprocessing)

    def predict_grid(self, prepared: np.ndarray) -> np.ndarray:
        """Probabilities (K, z, y, x) on the network's grid of an image made by :meth:`prepare`."""
        return ops.predict_probabilities(
            self.network, prepared, mode=self.preprocessing["mode"], patch_size=self.inference["patch_size"],
            tta=self.tta, batch_size=int(self.inference.get("batch_size", 8)),
            overlap=float(self.inference.get("overlap", 0.5)), whole_slice=self.whole_slice,
            divisor=int(self.plan["model"].get("largest_stride", 1)))

    def predict_prepared(self, prepared: np.ndarray, props: dict[str, Any],
                         original_shape: Sequence[int]) -> np.ndarray:
        """Probabilities (K, *original_shape) of an image made by :meth:`prepare`: :meth:`predict_grid`, mapped back."""
        return ops.restore(self.predict_grid(prepared), props, original_shape)


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail...)
        raise BundleError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err})") from None


def predict_with_bundle(bundle: Path, input_dir: Path, output_dir: Path, *, tta: bool = False,
                        whole_slice: bool | None = None, postprocess: bool = True, save_probabilities: bool = False,
                        overwrite: bool = False, threads: int | None = None,
                        progress: Callable | None = None) -> list[Path]:
    """Segment every case of ``input_dir`` into ``output_dir`` with a bundle (as ``medkd predict --bundle``)."""
    predictor = BundlePredictor(bundle, tta=tta, whole_slice=whole_slice, postprocess=postprocess, threads=threads)
    return predict_folder(predictor, Path(input_dir), Path(output_dir), save_probs=save_probabilities,
                          overwrite=overwrite, progress=progress)
