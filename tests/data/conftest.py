"""Fixtures building tiny nnU-Net v2 / MSD datasets on disk for the medkd.data tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medkd.data.io import Geometry, write_image

GEO3 = Geometry((0.8, 0.9, 2.0), (10.0, -5.0, 3.0), tuple(np.eye(3).ravel()))
GEO2 = Geometry((0.5, 0.7), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _case_arrays(rng: np.random.Generator, channels: int,
                 shape: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    images = [rng.integers(0, 200, shape).astype(np.float32 if len(shape) == 3 else np.uint8) for _ in range(channels)]
    label = rng.integers(0, len(LABELS), shape).astype(np.uint8)
    label.flat[: len(LABELS)] = np.arange(len(LABELS))  # every class present
    return images, label


@pytest.fixture
def nnunet_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make(num_train=3, num_test=1, channels=2, shape=(4, 5, 6), ending=".nii.gz", test_labels=True)``."""

    def make(num_train: int = 3, num_test: int = 1, channels: int = 2, shape: tuple[int, ...] = (4, 5, 6),
             ending: str = ".nii.gz", test_labels: bool = True, name: str = "Dataset001_Tiny") -> Path:
        root = tmp_path / name
        geometry = GEO3 if len(shape) == 3 else GEO2
        rng = np.random.default_rng(0)
        for index in range(num_train + num_test):
            split = "Tr" if index < num_train else "Ts"
            images, label = _case_arrays(rng, channels, shape)
            for c, image in enumerate(images):
                write_image(image, geometry, root / f"images{split}" / f"case_{index:03d}_{c:04d}{ending}")
            if split == "Tr" or test_labels:
                write_image(label, geometry, root / f"labels{split}" / f"case_{index:03d}{ending}")
        write_json(root / "dataset.json", {
            "name": name,
            "channel_names": {str(c): f"mod{c}" for c in range(channels)},
            "labels": LABELS,
            "numTraining": num_train,
            "file_ending": ending,
        })
        return root

    return make


@pytest.fixture
def msd_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make(num_train=2, num_test=1, channels=2, shape=(4, 5, 6))``: MSD layout with 4D images."""

    def make(num_train: int = 2, num_test: int = 1, channels: int = 2, shape: tuple[int, ...] = (4, 5, 6)) -> Path:
        root = tmp_path / "Task05_Tiny"
        rng = np.random.default_rng(1)
        training, test = [], []
        for index in range(num_train + num_test):
            images, label = _case_arrays(rng, channels, shape)
            image = np.stack(images) if channels > 1 else images[0]
            name = f"tiny_{index:02d}.nii.gz"
            if index < num_train:
                write_image(image, GEO3, root / "imagesTr" / name)
                write_image(label, GEO3, root / "labelsTr" / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                write_image(image, GEO3, root / "imagesTs" / name)
                test.append(f"./imagesTs/{name}")
        write_json(root / "dataset.json", {
            "name": "Tiny",
            "modality": {str(c): f"mod{c}" for c in range(channels)},
            "labels": {str(v): k for k, v in LABELS.items()},
            "numTraining": num_train,
            "training": training,
            "test": test,
        })
        return root

    return make
