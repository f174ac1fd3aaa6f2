from __future__ import annotations

import os

import numpy as np
import pytest

from medkd.data.dataset import load_dataset
from medkd.data.io import Geometry
from medkd.data.preprocess import PreprocessingPlan, make_plan, nonzero_bbox, preprocess_arrays, restore_probabilities
from medkd.data.store import PreprocessedStore


def _plan(mode="3d", **kw):
    base = dict(mode=mode, normalization=["zscore"], ct_stats=[None], target_spacing=None, crop_nonzero=True,
                num_channels=1)
    base.update(kw)
    return PreprocessingPlan(**base)


def test_zscore_crop_and_restore_round_trip():
    rng = np.random.default_rng(0)
    image = np.zeros((1, 6, 20, 24), np.float32)
    image[0, 1:5, 3:17, 5:20] = rng.normal(5, 2, (4, 14, 15))
    geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    out, _, props = preprocess_arrays(image, None, geometry, _plan())
    assert out.shape == (1, 4, 14, 15) and props["crop_bbox"] == [[1, 5], [3, 17], [5, 20]]
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    probs = np.zeros((2, *out.shape[1:]), np.float32)
    probs[1] = 1.0
    restored = restore_probabilities(probs, props, image.shape[1:])
    assert restored.shape == (2, 6, 20, 24)
    assert restored[1].sum() == 4 * 14 * 15 and restored[0, 0, 0, 0] == 1.0


def test_resampling_2d_keeps_slices_and_inverts_shape():
    image = np.ones((1, 5, 40, 30), np.float32)
    label = np.zeros((5, 40, 30), np.int16)
    label[:, 10:20, 10:20] = 2
    geometry = Geometry((0.5, 0.5, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    out, seg, props = preprocess_arrays(image, label, geometry, _plan("2d", target_spacing=[1.0, 1.0, 1.0], crop_nonzero=False))
    assert out.shape == (1, 5, 20, 15) and seg.shape == (1, 5, 20, 15)
    assert set(np.unique(seg)) == {0, 2}
    restored = restore_probabilities(np.ones((3, 5, 20, 15), np.float32) / 3, props, (5, 40, 30))
    assert restored.shape == (3, 5, 40, 30)


def test_ct_normalisation_clips_to_dataset_percentiles():
    plan = _plan(normalization=["ct"], ct_stats=[{"lower": -100.0, "upper": 200.0, "mean": 50.0, "std": 10.0}],
                 crop_nonzero=False)
    image = np.array([-1000.0, 0.0, 50.0, 3000.0], np.float32).reshape(1, 1, 1, 4)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    out, _, _ = preprocess_arrays(image, None, geometry, plan)
    np.testing.assert_allclose(out.ravel(), [-15.0, -5.0, 0.0, 15.0])


def test_nonzero_bbox_of_empty_image_is_everything():
    assert nonzero_bbox(np.zeros((1, 3, 4))) == [[0, 3], [0, 4]]


def test_cache_reuse_and_invalidation(phantoms_3d, tmp_path):
    dataset = load_dataset(phantoms_3d)
    cases = dataset.training[:3]
    plan = make_plan(dataset, cases, mode="3d")
    store = PreprocessedStore(dataset, plan, tmp_path)
    first = store.ensure(cases, num_workers=1)
    assert store.last_reused == 0 and first[0].load_image().shape[0] == 1
    assert PreprocessedStore(dataset, plan, tmp_path).ensure(cases, num_workers=1) and store.ensure(cases) and store.last_reused == 3
    # a source file changes -> that case is redone
    os.utime(cases[1].image_files[0], ns=(0, 12345))
    store.ensure(cases, num_workers=1)
    assert store.last_reused == 2
    # a half-written case (sidecar present, array missing) is redone, never used
    first[2].image_path.unlink()
    again = store.ensure(cases, num_workers=1)
    assert store.last_reused == 2 and again[2].image_path.is_file()
    # a different plan lives in a different folder
    other = PreprocessedStore(dataset, make_plan(dataset, cases, mode="2d"), tmp_path)
    assert other.folder != store.folder


def test_class_locations_are_recorded(phantoms_3d, tmp_path):
    dataset = load_dataset(phantoms_3d)
    case = PreprocessedStore(dataset, make_plan(dataset, dataset.training[:1], mode="3d"), tmp_path).ensure(dataset.training[:1])[0]
    locations = case.load_locations()
    label = case.load_label()
    assert sorted(locations) == [1, 2, 3, 4]
    for cls, coords in locations.items():
        assert (label[0][tuple(coords.T)] == cls).all()


def test_preprocessing_in_process_keeps_the_thread_count(phantoms_2d, tmp_path):
    """In-process preprocessing (one worker) used to leave the process on 1 intra-op thread, so a run
    that filled the cache trained on other numerics than its resume (relative L2 up to 1e-2 after 4 steps)."""
    import torch

    dataset = load_dataset(phantoms_2d)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        PreprocessedStore(dataset, make_plan(dataset, dataset.training[:2], mode="2d"), tmp_path).ensure(
            dataset.training[:2], num_workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
