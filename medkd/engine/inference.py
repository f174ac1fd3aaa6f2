"""Prediction: MONAI's sliding window (2D slice by slice, or 3D), optionally whole 2D slices, flip
test-time augmentation, mapping back to the input's exact grid and geometry, and post-processing.

2D mode runs a Gaussian-weighted sliding window of the training patch size over each slice by
default. ``data.whole_slice_inference: true`` (or ``whole_slice=True``) instead zero-pads each batch
of slices to a multiple of the network's largest stride and crops the output back
(:func:`medkd.models.forward_padded`): about 2-3x faster, but a network trained on patches smaller
than the slice sees other instance-norm statistics there (measured on ACDC with a 128-px-patch UNet:
0.805 mean test Dice on whole slices against 0.864 with the window), so it is for networks trained on
(nearly) whole slices. 3D mode always uses the sliding window.

``predict_probabilities`` works on a preprocessed array; ``Predictor`` goes from image files on disk
to a segmentation (and optionally float16 softmax probabilities) written with the input's spacing,
origin and direction; its segmentation is post-processed as decided on the run's validation cases
(``postprocessing.json`` beside the checkpoint, :mod:`medkd.engine.postprocess`). A teacher set
predicts the same way through :class:`medkd.engine.ensemble.EnsemblePredictor` (see
:func:`medkd.engine.ensemble.load_predictor`), which can also write a per-voxel uncertainty map
(and does not post-process).
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medkd.data.io import Geometry, file_ending, read_image, uncertainty_file, write_image
from medkd.data.preprocess import PreprocessingPlan, preprocess_arrays, restore_probabilities
from medkd.engine.postprocess import Postprocessing, postprocessing_beside
from medkd.models import create_from_spec, forward_padded, largest_stride
from medkd.storage import atomic_write_numpy, load_checkpoint


def _flip_sets(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    """All subsets of spatial axes to mirror (nnU-Net's mirroring TTA); axes counted from dim 2."""
    if not tta:
        return [()]
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def _mirrored_softmax(predictor: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, tta: bool) -> torch.Tensor:
    flips = _flip_sets(batch.ndim - 2, tta)
    total = None
    for axes in flips:
        x = torch.flip(batch, axes) if axes else batch
        probs = torch.softmax(predictor(x).float(), dim=1)
        probs = torch.flip(probs, axes) if axes else probs
        total = probs if total is None else total + probs
    return total / len(flips)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, image: np.ndarray | torch.Tensor, *, mode: str, patch_size: Sequence[int],
                          tta: bool = False, device: torch.device | str = "cpu", batch_size: int = 8,
                          overlap: float = 0.5, amp: bool = False, whole_slice: bool = False) -> torch.Tensor:
    """Softmax probabilities (K, z, y, x) on CPU for a preprocessed image (C, z, y, x).

    2D mode predicts batches of ``batch_size`` slices: whole (zero-padded to a multiple of the
    network's largest stride, cropped back) with ``whole_slice``, else with a 2D sliding window of
    ``patch_size``. 3D mode uses a 3D Gaussian-weighted sliding window (``whole_slice`` is ignored).
    ``tta`` averages over all mirrorings of the spatial axes. The model is put in eval mode.
    """
    model.eval()
    device = torch.device(device)
    volume = torch.tensor(np.asarray(image), dtype=torch.float32)  # a copy: cached arrays are read-only memmaps

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            return model(x)

    def window(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, list(patch_size), batch_size, predictor, overlap=overlap,
                                        mode="gaussian", sw_device=device, device="cpu")

    if mode == "2d":
        run = partial(forward_padded, predictor, divisor=largest_stride(model, 2, volume.shape[0])) \
            if whole_slice else window
        slices = volume.permute(1, 0, 2, 3)  # (z, C, y, x): slices as a batch
        chunks = [_mirrored_softmax(run, slices[i:i + batch_size].to(device), tta).cpu()
                  for i in range(0, slices.shape[0], batch_size)]
        return torch.cat(chunks).permute(1, 0, 2, 3).contiguous()
    if mode == "3d":
        return _mirrored_softmax(window, volume[None].to(device), tta)[0].cpu()
    raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")


def checkpoint_whole_slice(state: dict) -> bool:
    """Whether the run of checkpoint ``state`` predicted 2D slices whole: its config's
    ``data.whole_slice_inference``; ``False`` (the sliding window) for a run or checkpoint without it."""
    config = state.get("config") or {}
    return bool((config.get("data") or {}).get("whole_slice_inference", False))


class Predictor:
    """A trained network plus the preprocessing it was trained with, loaded from a checkpoint.

    Args:
        checkpoint: a medkd checkpoint (``best.pt``).
        device, tta, amp: where to run, flip test-time augmentation, mixed precision (CUDA only).
        whole_slice: 2D inference on whole slices (``True``) or with the sliding window
            (``False``); ``None`` follows the run (:func:`checkpoint_whole_slice`).
        postprocess: apply ``postprocessing.json`` beside the checkpoint when it was decided for
            this checkpoint (:func:`medkd.engine.postprocess.postprocessing_beside`). The decision
            in use is :attr:`postprocessing` (``None``: argmax only); it may be set directly.
    """

    num_members = 1  # one model: no member disagreement, hence no uncertainty map

    def __init__(self, checkpoint: str | Path, device: str = "cpu", tta: bool = False, amp: bool = False,
                 whole_slice: bool | None = None, postprocess: bool = True):
        state = load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.model = create_from_spec(state["model_spec"])
        self.model.load_state_dict(state["state_dict"])
        self.model.to(device).eval()
        self.plan = PreprocessingPlan.from_dict(state["preprocessing"]["plan"])
        self.patch_size = state["preprocessing"]["patch_size"]
        self.labels: dict[str, int] = state["labels"]
        self.device, self.tta, self.amp = device, tta, amp
        self.step: int | None = state.get("step")
        self.whole_slice = checkpoint_whole_slice(state) if whole_slice is None else bool(whole_slice)
        self.postprocessing: Postprocessing | None = \
            postprocessing_beside(self.checkpoint, self.step, self.labels) if postprocess else None

    @property
    def source(self) -> Path:
        """The file the model was loaded from (named in error messages)."""
        return self.checkpoint

    @property
    def num_channels(self) -> int:
        return self.plan.num_channels

    def check_image(self, image: np.ndarray) -> None:
        """Raise unless ``image`` (C, *spatial) has this model's channel count and only finite voxels."""
        if image.shape[0] != self.num_channels:
            raise ValueError(f"model expects {self.num_channels} channel(s), image has {image.shape[0]}")
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or Inf voxels")

    def prepare(self, image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, dict]:
        """The preprocessed image (C, z, y, x) and the properties that map a prediction back."""
        prepared, _, props = preprocess_arrays(image, None, geometry, self.plan)
        return prepared, props

    def predict_prepared(self, prepared: np.ndarray, props: dict, original_shape: Sequence[int]) -> np.ndarray:
        """Probabilities (K, *original_shape) from an image made by :meth:`prepare` (this model's plan)."""
        probs = predict_probabilities(self.model, prepared, mode=self.plan.mode, patch_size=self.patch_size,
                                      tta=self.tta, device=self.device, amp=self.amp, whole_slice=self.whole_slice)
        return restore_probabilities(probs.numpy(), props, original_shape)

    def predict_arrays(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Probabilities (K, *spatial) on the grid of ``image`` (C, *spatial) as read from disk."""
        self.check_image(image)
        prepared, props = self.prepare(image, geometry)
        return self.predict_prepared(prepared, props, image.shape[1:])

    def segment(self, probabilities: np.ndarray) -> np.ndarray:
        """Label map (*spatial) uint8 of probabilities (K, *spatial): argmax, then :attr:`postprocessing`."""
        labels = segmentation(probabilities)
        return labels if self.postprocessing is None else self.postprocessing.apply(labels)

    def predict_files(self, image_files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """Segmentation and probabilities for one case given its channel files (``_0000``, ``_0001``...)."""
        image, geometry = read_case(image_files)
        probs = self.predict_arrays(image, geometry)
        return self.segment(probs), probs, geometry


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


def segmentation(probabilities: np.ndarray) -> np.ndarray:
    """Label map (*spatial) uint8: the most probable class of probabilities (K, *spatial)."""
    return probabilities.argmax(0).astype(np.uint8)


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


def predict_folder(predictor: Predictor, input_dir: Path, output_dir: Path, *, save_probs: bool = False,
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
