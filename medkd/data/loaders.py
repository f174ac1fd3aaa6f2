"""Training patches: foreground-oversampled sampling, MONAI augmentation, step-indexed loading.

Sample ``k`` of the endless training stream is a pure function of ``(seed, k)``: the case, the
slice or patch position and every augmentation parameter are drawn from a generator seeded with
both. Step ``s`` of a run on ``W`` ranks with batch size ``B`` takes samples
``(s * W + rank) * B ... + B - 1``. So a resumed run sees exactly the batches the uninterrupted run
would have seen, whatever the number of loader workers, and DDP ranks never share a sample.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from torch.utils.data import DataLoader, Dataset, Sampler

from medkd.config import AugmentConfig
from medkd.data.preprocess import PreprocessedCase, class_locations


def build_augmentation(cfg: AugmentConfig, spatial_dims: int, image_keys: Sequence[str] = ("image",),
                       label_keys: Sequence[str] = ("label",), soft_keys: Sequence[str] = ()) -> Compose:
    """nnU-Net's usual set, as MONAI dictionary transforms.

    Spatial transforms act identically on every key (images and soft targets bilinear, labels
    nearest); intensity transforms act on ``image_keys`` only, never on soft targets.
    """
    keys = [*image_keys, *soft_keys, *label_keys]
    modes = ["bilinear"] * (len(image_keys) + len(soft_keys)) + ["nearest"] * len(label_keys)
    angle = np.deg2rad(cfg.rotate_deg)
    rotate_range = (angle,) if spatial_dims == 2 else (angle, angle, angle)
    scale = (cfg.scale_range[0] - 1.0, cfg.scale_range[1] - 1.0)
    transforms = [
        RandAffined(keys, prob=cfg.rotate_prob, rotate_range=rotate_range, mode=modes, padding_mode="zeros"),
        RandAffined(keys, prob=cfg.scale_prob, scale_range=(scale,) * spatial_dims, mode=modes, padding_mode="zeros"),
        *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)],
        RandGaussianNoised(list(image_keys), prob=cfg.noise_prob, std=cfg.noise_std),
        RandScaleIntensityd(list(image_keys), factors=0.25, prob=cfg.intensity_prob),
        RandAdjustContrastd(list(image_keys), prob=cfg.gamma_prob, gamma=cfg.gamma_range),
    ]
    return Compose(transforms)


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[:, start:start+size]`` over trailing axes, zero-padded where the window leaves it."""
    lead = array.ndim - len(size)
    out = np.zeros((*array.shape[:lead], *size), dtype=array.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for axis, (lo, n) in enumerate(zip(start, size)):
        extent = array.shape[lead + axis]
        a, b = max(lo, 0), min(lo + n, extent)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchDataset(Dataset):
    """Endless stream of training patches from preprocessed cases (C, z, y, x).

    2D mode: one slice, cropped/padded to ``patch_size`` (y, x). 3D mode: a (z, y, x) patch.
    With probability ``oversample`` a patch is centred (with jitter) on a random voxel of a random
    foreground class present in the case, so rare structures are seen often (nnU-Net's scheme).
    Items: ``{"image": (C, *patch) float32, "label": (1, *patch) int64, "labeled": bool, "case": index}``,
    plus ``"teacher": (K, *patch) float32`` when ``soft_targets`` (one cached teacher target per case,
    labelled cases first, then unlabelled; see :mod:`medkd.teachers.cache`) are given: cropped with the
    same window and moved by the same spatial augmentation as image and label.

    ``unlabeled`` cases (images without labels, for distillation) are drawn with probability
    ``unlabeled_ratio`` per sample; their ``label`` is all zeros and ``labeled`` False. Their
    foreground oversampling centres on classes of the cached teacher target's argmax when there is one.
    """

    def __init__(self, cases: Sequence[PreprocessedCase], *, spatial_dims: int, patch_size: Sequence[int],
                 oversample: float = 0.33, augment: AugmentConfig | None = None, seed: int = 0,
                 soft_targets: Sequence | None = None, unlabeled: Sequence[PreprocessedCase] = (),
                 unlabeled_ratio: float = 0.5):
        if not cases:
            raise ValueError("no labelled training cases to sample from")
        if spatial_dims == 3 and len(patch_size) != 3:
            raise ValueError(f"3D sampling needs a 3D patch size, got {list(patch_size)}")
        self.num_labeled = len(cases)
        self.cases = [*cases, *unlabeled]
        self.unlabeled_ratio = unlabeled_ratio if unlabeled else 0.0
        if soft_targets is not None and len(soft_targets) != len(self.cases):
            raise ValueError(f"{len(soft_targets)} cached teacher targets for {len(self.cases)} cases")
        self.soft_targets = soft_targets
        self.spatial_dims = spatial_dims
        self.patch_size = list(patch_size)
        self.oversample = oversample
        self.seed = seed
        self.augment_cfg = augment
        self._transform: Compose | None = None
        self._locations: dict[int, dict[int, np.ndarray]] = {}

    def __len__(self) -> int:  # endless; samplers index it directly
        return 2**62

    def _class_locations(self, index: int) -> dict[int, np.ndarray]:
        if index not in self._locations:
            if index < self.num_labeled:
                self._locations[index] = self.cases[index].load_locations()
            elif self.soft_targets is not None:  # unlabelled: where the teacher sees each class
                self._locations[index] = class_locations(self.soft_targets[index].full().argmax(0)[None], seed=0)
            else:
                self._locations[index] = {}
        return self._locations[index]

    def _draw_case(self, rng: np.random.Generator) -> int:
        if self.unlabeled_ratio and rng.random() < self.unlabeled_ratio:
            return self.num_labeled + int(rng.integers(len(self.cases) - self.num_labeled))
        return int(rng.integers(self.num_labeled))

    def _window(self, rng: np.random.Generator, shape: Sequence[int], centre: Sequence[int] | None) -> list[int]:
        """Start corner of a patch of ``self.patch_size`` inside (or around) ``shape``."""
        starts = []
        for extent, size, axis in zip(shape, self.patch_size, range(len(shape))):
            if centre is None:
                lo, hi = min(0, extent - size), max(0, extent - size)
                starts.append(int(rng.integers(lo, hi + 1)))
            else:
                jitter = int(rng.integers(-size // 4, size // 4 + 1))
                starts.append(int(centre[axis]) - size // 2 + jitter)
        return starts

    def sample(self, k: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, k))
        index = self._draw_case(rng)
        case = self.cases[index]
        labeled = index < self.num_labeled
        image, label = case.load_image(), case.load_label() if labeled else None
        locations = self._class_locations(index)
        centre = None
        if locations and rng.random() < self.oversample:
            cls = list(locations)[int(rng.integers(len(locations)))]
            centre = locations[cls][int(rng.integers(len(locations[cls])))]
        z = None
        if self.spatial_dims == 2:
            z = int(centre[0]) if centre is not None else int(rng.integers(image.shape[1]))
            image, label = image[:, z], None if label is None else label[:, z]
            centre = None if centre is None else centre[1:]
        start = self._window(rng, image.shape[1:], centre)
        item = {
            "image": crop_or_pad(image, start, self.patch_size).astype(np.float32),
            # unlabelled: an all-zero patch (never a whole-volume array), ignored by the supervised term
            "label": crop_or_pad(label, start, self.patch_size) if labeled
            else np.zeros((1, *self.patch_size), dtype=np.int16),
            "transform_seed": int(rng.integers(2**31 - 1)),
            "case": index,
            "labeled": labeled,
        }
        if self.soft_targets is not None:
            item["teacher"] = self.soft_targets[index].crop(z, start, self.patch_size)
        return item

    def __getitem__(self, k: int) -> dict[str, torch.Tensor | int]:
        item = self.sample(k)
        data = {"image": item["image"], "label": item["label"].astype(np.float32)}
        soft_keys = ("teacher",) if "teacher" in item else ()
        data.update({key: item[key] for key in soft_keys})
        if self.augment_cfg is not None and self.augment_cfg.enabled:
            if self._transform is None:
                set_track_meta(False)
                self._transform = build_augmentation(self.augment_cfg, self.spatial_dims, soft_keys=soft_keys)
            self._transform.set_random_state(seed=item["transform_seed"])
            data = self._transform(data)
        out = {
            "image": torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32),
            "label": torch.as_tensor(np.asarray(data["label"])).round().long(),
            "labeled": item["labeled"],
            "case": item["case"],
        }
        out.update({key: torch.as_tensor(np.asarray(data[key]), dtype=torch.float32) for key in soft_keys})
        return out


class StepSampler(Sampler[list[int]]):
    """Batches of sample indices for steps ``start_step, start_step + 1, ...`` (endless)."""

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start_step, self.rank, self.world_size = batch_size, start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1

    def __len__(self) -> int:
        return 2**62


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    set_track_meta(False)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_train_loader(dataset: PatchDataset, batch_size: int, *, start_step: int = 0, rank: int = 0,
                      world_size: int = 1, num_workers: int = 2) -> DataLoader:
    """A loader that prefetches batches in ``num_workers`` processes while the model trains.

    At most one worker per core this process may run on (a run pinned to one core gets one worker: more
    would only share that core, and torch warns about them). It has its own generator: creating its
    iterator draws a seed, which from the global torch RNG would shift every later global draw of a resumed
    run (whose iterator starts at the resume step) by one.
    """
    num_workers = min(num_workers, usable_cores())
    sampler = StepSampler(batch_size, start_step, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(dataset.seed),
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
