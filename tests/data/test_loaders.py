from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.config import AugmentConfig
from medkd.data.dataset import load_dataset
from medkd.data.loaders import PatchDataset, StepSampler, crop_or_pad, make_train_loader
from medkd.data.preprocess import make_plan
from medkd.data.store import PreprocessedStore


@pytest.fixture(scope="module")
def cases_3d(phantoms_3d, tmp_path_factory):
    dataset = load_dataset(phantoms_3d)
    plan = make_plan(dataset, dataset.training, mode="3d")
    return PreprocessedStore(dataset, plan, tmp_path_factory.mktemp("cache")).ensure(dataset.training, num_workers=1)


def test_samples_are_a_function_of_seed_and_index(cases_3d):
    ds = PatchDataset(cases_3d, spatial_dims=3, patch_size=[8, 32, 32], augment=AugmentConfig(), seed=5)
    a, b, c = ds[17], ds[17], ds[18]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 8, 32, 32) and a["label"].shape == (1, 8, 32, 32) and a["label"].dtype == torch.int64


def test_2d_slices_and_padding(cases_3d):
    ds = PatchDataset(cases_3d, spatial_dims=2, patch_size=[64, 80], augment=None)
    item = ds[0]
    assert item["image"].shape == (1, 64, 80)  # 48x48 slices padded


def test_foreground_oversampling(cases_3d):
    always = PatchDataset(cases_3d, spatial_dims=2, patch_size=[16, 16], oversample=1.0, augment=None)
    never = PatchDataset(cases_3d, spatial_dims=2, patch_size=[16, 16], oversample=0.0, augment=None)
    hit_always = np.mean([(always[k]["label"] > 0).any().item() for k in range(60)])
    hit_never = np.mean([(never[k]["label"] > 0).any().item() for k in range(60)])
    assert hit_always == 1.0 and hit_never < hit_always
    lesion = np.mean([(always[k]["label"] == 4).any().item() for k in range(200)])
    assert lesion > 0.15  # the <1% class is a quarter of the oversampled targets


def test_spatial_augmentation_moves_image_and_label_together():
    from monai.data import set_track_meta

    from medkd.data.loaders import build_augmentation

    set_track_meta(False)
    cfg = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, flip_prob=0.5, noise_prob=0, intensity_prob=0, gamma_prob=0)
    transform = build_augmentation(cfg, spatial_dims=2)
    label = np.zeros((1, 48, 48), np.float32)
    label[0, 10:30, 14:40] = 1
    label[0, 18:24, 20:26] = 2
    for seed in range(5):
        transform.set_random_state(seed=seed)
        out = transform({"image": label * 10.0, "label": label.copy()})
        moved_image, moved_label = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
        assert not np.array_equal(moved_label, label[0])
        assert set(np.unique(moved_label)) <= {0.0, 1.0, 2.0}  # nearest: no blended labels
        agree = (np.rint(moved_image / 10.0) == moved_label).mean()
        assert agree > 0.97  # same geometric transform (only interpolation at edges differs)


def test_step_sampler_ranks_are_disjoint_and_resumable():
    r0 = iter(StepSampler(4, start_step=0, rank=0, world_size=2))
    r1 = iter(StepSampler(4, start_step=0, rank=1, world_size=2))
    seen0 = [next(r0) for _ in range(3)]
    seen1 = [next(r1) for _ in range(3)]
    assert not set(sum(seen0, [])) & set(sum(seen1, []))
    resumed = iter(StepSampler(4, start_step=2, rank=0, world_size=2))
    assert next(resumed) == seen0[2]


def test_loader_with_workers_matches_in_process(cases_3d):
    ds = PatchDataset(cases_3d, spatial_dims=2, patch_size=[32, 32], augment=AugmentConfig(), seed=1)
    with_workers = next(iter(make_train_loader(ds, 3, start_step=4, num_workers=2)))
    in_process = next(iter(make_train_loader(ds, 3, start_step=4, num_workers=0)))
    assert torch.equal(with_workers["image"], in_process["image"])


def test_a_run_pinned_to_one_core_gets_one_worker_and_no_torch_warning(cases_3d, monkeypatch):
    import warnings

    ds = PatchDataset(cases_3d, spatial_dims=2, patch_size=[32, 32], augment=AugmentConfig(), seed=1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    loader = make_train_loader(ds, 3, start_step=4, num_workers=2)
    assert loader.num_workers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "will create 2 worker processes ... suggested max 1"
        batches = iter(loader)
    in_process = next(iter(make_train_loader(ds, 3, start_step=4, num_workers=0)))
    assert torch.equal(next(batches)["image"], in_process["image"])
    assert make_train_loader(ds, 3, num_workers=0).num_workers == 0


def testcrop_or_pad():
    array = np.arange(12).reshape(1, 3, 4)
    out = crop_or_pad(array, [-1, 2], [3, 3])
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [2, 3, 0])


def test_starting_the_loader_leaves_the_global_rng_alone(cases_3d):
    """A resumed run starts its loader at the resume step; a draw from the global RNG there used to
    shift every later global draw (e.g. unseeded contrastive voxel sampling) against the uninterrupted run."""
    ds = PatchDataset(cases_3d, spatial_dims=3, patch_size=(8, 16, 16), seed=1)
    torch.manual_seed(0)
    iter(make_train_loader(ds, 2, num_workers=0))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
