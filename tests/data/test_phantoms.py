"""Tests for medkd.data.phantoms: determinism, layout, classes, lesion size, sites, validation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medkd.data.dataset import load_dataset, read_case
from medkd.data.io import read_image
from medkd.data.phantoms import LABELS, make_phantoms, site_parameters
from medkd.data.splits import get_split
from medkd.data.validate import check_dataset


def _all_cases(root):
    ds = load_dataset(root)
    return ds, [(c, *read_case(c, ds)) for c in ds.training + ds.test]


@pytest.fixture(scope="module")
def default_3d(tmp_path_factory):
    """The default 3D dataset (24 + 8 cases of 32x64x64); also checks it is fast to make."""
    start = time.perf_counter()
    root = make_phantoms(tmp_path_factory.mktemp("p3") / "Dataset900_Phantom3D", spatial_dims=3)
    return root, time.perf_counter() - start


@pytest.fixture(scope="module")
def default_2d(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("p2") / "Dataset901_Phantom2D", spatial_dims=2)


def test_default_3d_layout_dtype_and_speed(default_3d):
    root, seconds = default_3d
    assert seconds < 15.0, f"making the default 3D phantoms took {seconds:.1f}s"
    description = json.loads((root / "dataset.json").read_text())
    assert description["labels"] == LABELS and description["file_ending"] == ".nii.gz"
    assert description["numTraining"] == 24 and description["channel_names"] == {"0": "MRI"}
    ds = load_dataset(root)
    assert len(ds.training) == 24 and len(ds.test) == 8
    assert ds.training[0].case_id == "phantom_000" and ds.test[0].case_id == "phantom_024"
    image, geometry = read_image(root / "imagesTr" / "phantom_000_0000.nii.gz")
    assert image.shape == (32, 64, 64) and image.dtype == np.float32
    assert geometry.spacing == (1.0, 1.0, 2.5) and any(o != 0 for o in geometry.origin)
    assert read_image(root / "labelsTs" / "phantom_031.nii.gz")[0].shape == (32, 64, 64)


@pytest.mark.parametrize("dims", [2, 3])
def test_all_classes_present_and_lesion_small(default_2d, default_3d, dims):
    root = default_2d if dims == 2 else default_3d[0]
    fractions = []
    for case, image, label, _ in _all_cases(root)[1]:
        counts = np.bincount(label.ravel(), minlength=len(LABELS))
        assert len(counts) == len(LABELS) and np.all(counts > 0), f"{case.case_id}: class counts {counts}"
        fractions.append(counts[4] / counts[1:].sum())
    assert np.mean(fractions) < 0.01


def test_default_2d_png_uint8(default_2d):
    ds = load_dataset(default_2d)
    assert ds.file_ending == ".png" and len(ds.training) == 24 and len(ds.test) == 8
    image, geometry = read_image(default_2d / "imagesTr" / "phantom_005_0000.png")
    assert image.shape == (96, 96) and image.dtype == np.uint8 and geometry.ndim == 2
    assert 10 < image.mean() < 245 and image.std() > 5


def test_spatial_relations_2d(default_2d):
    """core nested in the organ, neighbour touching the organ, lesion inside the organ."""
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    for case, _, label, _ in _all_cases(default_2d)[1]:
        organ_region = np.isin(label, (1, 2, 4))
        around_core = binary_dilation(label == 2, cross) & (label != 2)
        assert np.all(np.isin(label[around_core], (1, 4))), case.case_id
        around_lesion = binary_dilation(label == 4, cross) & (label != 4)
        assert np.all(np.isin(label[around_lesion], (1, 2))), case.case_id
        assert np.any(binary_dilation(organ_region, cross) & (label == 3)), case.case_id


def test_sites_recorded_round_robin_and_different(default_3d):
    root = default_3d[0]
    meta = json.loads((root / "case_metadata.json").read_text())
    ds, cases = _all_cases(root)
    assert set(meta) == {c.case_id for c in ds.training + ds.test}
    sites = [ds.case(f"phantom_{i:03d}").metadata["site"] for i in range(32)]
    assert sites[:6] == ["site1", "site2", "site3", "site1", "site2", "site3"] and len(set(sites)) >= 3
    organ_median = {}
    for case, image, label, _ in cases:
        organ_median.setdefault(case.metadata["site"], []).append(np.median(image[0][label == 1]))
    medians = sorted(np.mean(v) for v in organ_median.values())
    assert min(np.diff(medians)) > 20.0  # sites differ clearly in intensity
    assert len({tuple(p.values()) for p in site_parameters(5)}) == 5


def test_default_3d_passes_validation_and_splits(default_3d):
    root = default_3d[0]
    assert check_dataset(root) == []
    train, val = get_split(load_dataset(root), 0)
    assert len(train) + len(val) == 24


def test_deterministic(tmp_path):
    kwargs = dict(spatial_dims=3, num_train=2, num_test=1, shape=(16, 24, 24), seed=7)
    a, b = make_phantoms(tmp_path / "a", **kwargs), make_phantoms(tmp_path / "b", **kwargs)
    c = make_phantoms(tmp_path / "c", **{**kwargs, "seed": 8})
    for rel in ("imagesTr/phantom_001_0000.nii.gz", "labelsTr/phantom_001.nii.gz", "imagesTs/phantom_002_0000.nii.gz"):
        assert read_image(a / rel)[0].tobytes() == read_image(b / rel)[0].tobytes()
        assert read_image(a / rel)[0].tobytes() != read_image(c / rel)[0].tobytes()
    assert (a / "case_metadata.json").read_text() == (b / "case_metadata.json").read_text()


def test_custom_2d_nifti_shape(tmp_path):
    root = make_phantoms(tmp_path / "d", spatial_dims=2, num_train=3, num_test=0, shape=(40, 48),
                         file_ending=".nii.gz", num_sites=4)
    ds = load_dataset(root)
    image, label, _ = read_case(ds.training[2], ds)
    assert image.shape == (1, 40, 48) and label.shape == (40, 48)
    assert set(np.unique(label)) == set(LABELS.values())
    assert not (root / "imagesTs").exists() or not any((root / "imagesTs").iterdir())
    assert check_dataset(root) == []


def test_refuses_to_overwrite(tmp_path):
    root = make_phantoms(tmp_path / "p", spatial_dims=2, num_train=5, num_test=1, shape=(32, 32))
    with pytest.raises(FileExistsError, match=str(root)):
        make_phantoms(root, spatial_dims=2, num_train=2, num_test=0, shape=(32, 32))
    (root / "keep.txt").write_text("user file")
    make_phantoms(root, spatial_dims=2, num_train=2, num_test=0, shape=(32, 32), overwrite=True)
    ds = load_dataset(root)
    assert [c.case_id for c in ds.training] == ["phantom_000", "phantom_001"] and ds.test == []
    assert (root / "keep.txt").exists() and check_dataset(root) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 4},
        {"spatial_dims": 3, "file_ending": ".png"},
        {"spatial_dims": 3, "shape": (32, 32)},
        {"spatial_dims": 2, "shape": (8, 8)},
        {"spatial_dims": 2, "num_train": 0},
        {"spatial_dims": 2, "file_ending": ".jpg"},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_phantoms(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
