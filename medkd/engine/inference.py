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

from medkd.data.io import Geometry
from medkd.data.preprocess import PreprocessingPlan, preprocess_arrays, restore_probabilities
from medkd.engine.case_io import (  # noqa: F401  (torch-free; re-exported from their former home)
    CaseSegmenter, check_image, group_channel_files, predict_folder, read_case, save_probabilities, segmentation)
from medkd.engine.postprocess import Postprocessing, postprocessing_beside
from medkd.models import create_from_spec, forward_padded, largest_stride
from medkd.storage import load_checkpoint


def _flip_sets(spatial_dims: int, tta: bool, mirror_axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """All subsets of the spatial axes to mirror (nnU-Net's mirroring TTA), counted from dim 2 of the
    batch; ``mirror_axes`` (spatial axes, 0 = first) limits them, as an nnU-Net checkpoint's
    ``inference_allowed_mirroring_axes`` does."""
    if not tta:
        return [()]
    allowed = range(spatial_dims) if mirror_axes is None else [a for a in mirror_axes if a < spatial_dims]
    axes = [2 + a for a in allowed]
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _mirrored_softmax(predictor: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, tta: bool,
                      mirror_axes: Sequence[int] | None = None) -> torch.Tensor:
    flips = _flip_sets(batch.ndim - 2, tta, mirror_axes)
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
                          overlap: float = 0.5, amp: bool = False, whole_slice: bool = False,
                          mirror_axes: Sequence[int] | None = None, mean_logits: bool = False) -> torch.Tensor:
    """Softmax probabilities (K, z, y, x) on CPU for a preprocessed image (C, z, y, x).

    2D mode predicts batches of ``batch_size`` slices: whole (zero-padded to a multiple of the
    network's largest stride, cropped back) with ``whole_slice``, else with a 2D sliding window of
    ``patch_size``. 3D mode uses a 3D Gaussian-weighted sliding window (``whole_slice`` is ignored).
    ``tta`` averages over all mirrorings of the spatial axes (of ``mirror_axes`` only, when given:
    spatial axes of the network's input, 0 = first): the mean of the mirrorings' probabilities, or with
    ``mean_logits`` (imported nnU-Net models, as nnU-Net predicts) the softmax of their mean logits, each
    window mirrored on its own as nnU-Net mirrors its tiles. Overlapping windows always average logits
    (MONAI's Gaussian weights). The model is put in eval mode.
    """
    model.eval()
    device = torch.device(device)
    volume = torch.tensor(np.asarray(image), dtype=torch.float32)  # a copy: cached arrays are read-only memmaps

    def network(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            return model(x)

    def mirrored_network(x: torch.Tensor) -> torch.Tensor:  # nnU-Net: every tile mirrored, logits averaged
        flips = _flip_sets(x.ndim - 2, True, mirror_axes)
        return sum(torch.flip(network(torch.flip(x, f)), f) if f else network(x) for f in flips) / len(flips)

    predictor = mirrored_network if mean_logits and tta else network
    tta = tta and not mean_logits  # mirrored inside each window instead

    def window(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, list(patch_size), batch_size, predictor, overlap=overlap,
                                        mode="gaussian", sw_device=device, device="cpu")

    if mode == "2d":
        run = partial(forward_padded, predictor, divisor=largest_stride(model, 2, volume.shape[0])) \
            if whole_slice else window
        slices = volume.permute(1, 0, 2, 3)  # (z, C, y, x): slices as a batch
        chunks = [_mirrored_softmax(run, slices[i:i + batch_size].to(device), tta, mirror_axes).cpu()
                  for i in range(0, slices.shape[0], batch_size)]
        return torch.cat(chunks).permute(1, 0, 2, 3).contiguous()
    if mode == "3d":
        return _mirrored_softmax(window, volume[None].to(device), tta, mirror_axes)[0].cpu()
    raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")


def checkpoint_whole_slice(state: dict) -> bool:
    """Whether the run of checkpoint ``state`` predicted 2D slices whole: its config's
    ``data.whole_slice_inference``; ``False`` (the sliding window) for a run or checkpoint without it."""
    config = state.get("config") or {}
    return bool((config.get("data") or {}).get("whole_slice_inference", False))


class Predictor(CaseSegmenter):
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
        self.mirror_axes: list[int] | None = state.get("mirror_axes")  # TTA axes an imported nnU-Net model allows
        self.mean_logits = "nnunet" in state  # an imported nnU-Net model averages TTA logits, as nnU-Net does
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
        """Raise unless ``image`` (C, *spatial) has this model's channel count and dimensionality
        and only finite voxels (:func:`medkd.engine.case_io.check_image`)."""
        check_image(image, self.num_channels, self.plan.mode)

    def prepare(self, image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, dict]:
        """The preprocessed image (C, z, y, x) and the properties that map a prediction back."""
        prepared, _, props = preprocess_arrays(image, None, geometry, self.plan)
        return prepared, props

    def predict_prepared(self, prepared: np.ndarray, props: dict, original_shape: Sequence[int]) -> np.ndarray:
        """Probabilities (K, *original_shape) from an image made by :meth:`prepare` (this model's plan)."""
        probs = predict_probabilities(self.model, prepared, mode=self.plan.mode, patch_size=self.patch_size,
                                      tta=self.tta, device=self.device, amp=self.amp, whole_slice=self.whole_slice,
                                      mirror_axes=self.mirror_axes, mean_logits=self.mean_logits)
        return restore_probabilities(probs.numpy(), props, original_shape)

    def predict_files(self, image_files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """Segmentation and probabilities for one case given its channel files (``_0000``, ``_0001``...)."""
        image, geometry = read_case(image_files)
        probs = self.predict_arrays(image, geometry)
        return self.segment(probs), probs, geometry
