"""Case files of an image folder and prediction of a whole folder, without PyTorch.

nnU-Net channel naming (``CASE_0000.ext``, ``CASE_0001.ext``...), reading one case's channels, the
argmax label map, and :func:`predict_folder`, which drives any predictor with the interface of
:class:`medkd.engine.inference.Predictor` (``num_channels``, ``num_members``, ``labels``, ``source``,
``check_image``, ``predict_arrays``, ``segment``): the PyTorch predictor, a teacher set, or the
onnxruntime bundle predictor of :mod:`medkd.deploy.runtime`, which must run where PyTorch is not
installed; this module therefore imports numpy, SimpleITK and torch-free medkd modules only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medkd.data.io import Geometry, file_ending, read_image, uncertainty_file, write_image
from medkd.storage import atomic_write_numpy

__all__ = ["check_image", "group_channel_files", "predict_folder", "read_case", "save_probabilities", "segmentation"]


def read_case(image_files: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """One case's channel files (``_0000``, ``_0001``...) as a float32 image (C, *spatial) and its geometry.

    Every channel must have channel 0's shape and geometry and only finite voxels (the error names the file:
    a NaN voxel would otherwise spread through the normalisation and the network unnoticed).
    """
    arrays, geometry = [], None
    for path in image_files:
        array, geo = read_image(path)
        if geometry is not None and (array.shape != arrays[0].shape or not geo.matches(geometry)):
            raise ValueError(f"{path}: shape/geometry differs from channel 0 ({image_files[0]})")
        bad = int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
        if bad:
            raise ValueError(f"{path}: image holds {bad} NaN/Inf voxel(s); fix or remove the file")
        arrays.append(array)
        geometry = geometry or geo
    return np.stack(arrays).astype(np.float32), geometry


def check_image(image: np.ndarray, num_channels: int, mode: str) -> None:
    """Raise a ``ValueError`` unless ``image`` (C, *spatial) suits a model of ``num_channels`` inputs trained
    in ``mode``: ``"3d"`` takes volumes (z, y, x), ``"2d"`` volumes or native 2D images (y, x); voxels finite."""
    axes = (3,) if mode == "3d" else (2, 3)
    if image.ndim - 1 not in axes:
        raise ValueError(f"a {mode} model takes {' or '.join(f'{a}D' for a in axes)} images; this case is "
                         f"{image.ndim - 1}D {tuple(image.shape[1:])}"
                         + (" (a 4D or multi-component channel file?)" if image.ndim > 4 else ""))
    if image.shape[0] != num_channels:
        raise ValueError(f"model expects {num_channels} channel(s), image has {image.shape[0]}")
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or Inf voxels")


def segmentation(probabilities: np.ndarray) -> np.ndarray:
    """Label map (*spatial) uint8: the most probable class of probabilities (K, *spatial)."""
    return probabilities.argmax(0).astype(np.uint8)


class CaseSegmenter:
    """What a predictor of either kind (PyTorch checkpoint, ONNX bundle) does with one case's arrays.

    Subclasses provide ``check_image(image)``, ``prepare(image, geometry) -> (prepared, props)``,
    ``predict_prepared(prepared, props, original_shape)`` and a ``postprocessing`` attribute (or None).
    """

    postprocessing: Any = None

    def predict_arrays(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Probabilities (K, *spatial) on the grid of ``image`` (C, *spatial) as read from disk."""
        self.check_image(image)  # type: ignore[attr-defined]
        prepared, props = self.prepare(image, geometry)  # type: ignore[attr-defined]
        return self.predict_prepared(prepared, props, image.shape[1:])  # type: ignore[attr-defined]

    def segment(self, probabilities: np.ndarray) -> np.ndarray:
        """Label map (*spatial) uint8 of probabilities (K, *spatial): argmax, then :attr:`postprocessing`."""
        labels = segmentation(probabilities)
        return labels if self.postprocessing is None else self.postprocessing.apply(labels)


def group_channel_files(folder: Path, num_channels: int) -> dict[str, list[Path]]:
    """nnU-Net naming: ``CASE_0000.ext``, ``CASE_0001.ext``...; every case must have exactly the model's channels
    (an extra ``_0001`` for a 1-channel model means the wrong model or folder, and is refused, not ignored)."""
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        try:
            ending = file_ending(path)
        except ValueError:
            continue
        stem = path.name[: -len(ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise ValueError(f"{path}: expected nnU-Net channel naming CASE_XXXX{ending}")
        cases.setdefault(stem[:-5], {})[int(stem[-4:])] = path
    grouped = {}
    for case_id, channels in cases.items():
        extra = [channels[c] for c in sorted(channels) if c >= num_channels]
        if extra:
            raise ValueError(f"{extra[0]}: the model takes {num_channels} channel(s) (_0000"
                             f"{f' to _{num_channels - 1:04d}' if num_channels > 1 else ''}) but case {case_id} "
                             f"has channel file(s) {', '.join(p.name for p in extra)}; wrong model or input folder?")
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            raise FileNotFoundError(f"case {case_id} in {folder}: missing channel file(s) "
                                    + ", ".join(f"{case_id}_{c:04d}" for c in missing))
        grouped[case_id] = [channels[c] for c in range(num_channels)]
    if not grouped:
        raise FileNotFoundError(f"no images with a supported ending in {folder}")
    return grouped


def save_probabilities(path: Path, probabilities: np.ndarray, labels: dict[str, int]) -> None:
    """float16 softmax probabilities (K, *spatial) as ``.npz`` (keys: probabilities, class_names)."""
    names = sorted(labels, key=labels.get)
    atomic_write_numpy(path, np.savez_compressed, probabilities=probabilities.astype(np.float16),
                       class_names=np.array(names))


def predict_folder(predictor: Any, input_dir: Path, output_dir: Path, *, save_probs: bool = False,
                   uncertainty: bool = False, overwrite: bool = False, progress: Callable | None = None) -> list[Path]:
    """Predict every case in ``input_dir``; writes ``CASE<ending>`` (+ ``CASE.npz``) into ``output_dir``.

    ``predictor`` is a :class:`Predictor` or a :class:`medkd.engine.ensemble.EnsemblePredictor`
    (whose ``.npz`` holds the combined probabilities). ``uncertainty=True`` also writes
    ``CASE_uncertainty<ending>`` (float32, the input's geometry; ``.nii.gz`` for PNG inputs, which
    cannot hold floats) and needs an ensemble of at least two members. Segmentations come from
    ``predictor.segment`` (post-processed for a single model with a decision); ``.npz``
    probabilities are never post-processed.
    """
    if uncertainty and predictor.num_members < 2:
        raise ValueError(f"an uncertainty map needs a teacher set of at least 2 members (teachers.json or its "
                         f"folder); {predictor.source} holds one model, which has no member disagreement to map")
    grouped = group_channel_files(Path(input_dir), predictor.num_channels)
    output_dir = Path(output_dir)
    outputs = {case: output_dir / f"{case}{file_ending(files[0])}" for case, files in grouped.items()}
    maps = {case: uncertainty_file(path) for case, path in outputs.items()} if uncertainty else {}
    existing = [p for p in [*outputs.values(), *maps.values()] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} prediction(s) already in {output_dir} (e.g. {existing[0].name}); "
                              "pass --overwrite to replace them or choose another output folder")
    written = []
    items = list(grouped.items())
    for case_id, files in (progress(items) if progress else items):
        image, geometry = read_case(files)
        check = getattr(predictor, "check_image", None)
        try:
            check(image) if check is not None else None
        except ValueError as err:  # name the files: the message alone does not say which case is wrong
            raise ValueError(f"{', '.join(map(str, files))}: {err}") from None
        if uncertainty:
            probs, spread = predictor.predict_with_uncertainty(image, geometry)
            write_image(spread.astype(np.float32), geometry, maps[case_id])
        else:
            probs = predictor.predict_arrays(image, geometry)
        write_image(predictor.segment(probs), geometry, outputs[case_id])
        if save_probs:
            save_probabilities(output_dir / f"{case_id}.npz", probs, predictor.labels)
        written.append(outputs[case_id])
    return written
