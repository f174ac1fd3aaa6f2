"""The planner's rules (nnU-Net's, for a CPU budget) on synthetic fingerprints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medkd.plans import Budget, plan_dataset
from medkd.plans.planner import fullres_spacing
from medkd.plans.topology import initial_patch_size, reduce_patch, topology


def _fingerprint(spacings, shapes, dims=3, physical=True, channels=("MRI",)):
    return {"dataset": "Synthetic", "num_cases": len(spacings), "num_channels": len(channels),
            "channel_names": list(channels), "spatial_dims": dims, "physical_spacing": physical,
            "spacings": [list(map(float, s)) for s in spacings], "shapes_after_crop": [list(s) for s in shapes],
            "median_spacing": np.median(spacings, axis=0).tolist(), "median_shape": np.median(shapes, axis=0).tolist(),
            "anisotropy": 1.0, "foreground_intensities": [], "class_frequencies": {}, "total_voxels": 0.0}


def test_anisotropic_axis_gets_its_10th_percentile_spacing():
    spacings = [[z, 1.5, 1.5] for z in (5.0, 6.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0)]
    shapes = [[10, 200, 200]] * 10
    target = fullres_spacing(_fingerprint(spacings, shapes))
    assert target[1:] == [1.5, 1.5]
    assert target[0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))
    isotropic = fullres_spacing(_fingerprint([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.2, 1.0, 1.0]], [[100] * 3] * 3))
    assert isotropic == [1.2, 1.0, 1.0]  # the median


def test_coarse_axis_is_pooled_only_when_the_others_caught_up():
    topo = topology([5.0, 1.25, 1.25], [16, 160, 160])
    assert topo.strides[0] == (1, 2, 2) and topo.strides[1] == (1, 2, 2)  # 1.25 -> 2.5 -> 5: now within 2x
    assert topo.strides[2] == (2, 2, 2)
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisor))


def test_initial_patch_follows_the_spacing_and_reduction_shrinks_the_largest_axis():
    patch = initial_patch_size([2.0, 1.0, 1.0], [400, 400, 400])
    assert patch[0] < patch[1] == patch[2]
    smaller = reduce_patch((64, 128, 128), (100, 100, 100), (1.0, 1.0, 1.0), (32, 32, 32))
    assert smaller is not None and math.prod(smaller) < 64 * 128 * 128 and smaller[0] == 64


def test_plan_fits_the_budget_and_says_what_it_traded():
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 40, [[128, 160, 160]] * 40)
    generous = plan_dataset(fp, num_classes=3, budget=Budget(min_steps=10, memory_gb=64))
    tight = plan_dataset(fp, num_classes=3, budget=Budget(min_steps=600))
    big, small = generous["configurations"]["3d_fullres"], tight["configurations"]["3d_fullres"]
    assert math.prod(small["patch_size"]) < math.prod(big["patch_size"])
    assert small["teacher"]["est_step_s"] <= Budget(min_steps=600).step_seconds
    assert small["teacher"]["est_steps_in_budget"] >= 600
    assert any(t.startswith("patch ") for t in small["trades"])
    assert small["batch_size"] >= 2 and small["normalization"] == ["zscore"]
    assert small["student"]["shrink"] == small["teacher"]["shrink"] + 3
    assert small["student"]["parameters"] < small["teacher"]["parameters"] / 20


def test_ct_channels_get_ct_normalisation_and_huge_images_a_lowres_configuration():
    fp = _fingerprint([[1.0, 0.8, 0.8]] * 4, [[400, 512, 512]] * 4, channels=("CT", "PET"))
    plans = plan_dataset(fp, num_classes=2)
    assert set(plans["configurations"]) == {"2d", "3d_fullres", "3d_lowres"}
    lowres = plans["configurations"]["3d_lowres"]
    assert lowres["normalization"] == ["ct", "zscore"]
    assert all(lo > hi for lo, hi in zip(lowres["target_spacing"], plans["configurations"]["3d_fullres"]["target_spacing"]))
    small = plan_dataset(_fingerprint([[1.0] * 3] * 4, [[64, 64, 64]] * 4), num_classes=2)
    assert "3d_lowres" not in small["configurations"]


def test_images_without_physical_spacing_are_not_resampled():
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 5, [[1, 96, 96]] * 5, dims=2, physical=False)
    plans = plan_dataset(fp, num_classes=2)
    assert list(plans["configurations"]) == ["2d"]
    assert plans["configurations"]["2d"]["target_spacing"] is None
    assert plans["configurations"]["2d"]["patch_size"] == [96, 96]


def test_throughput_is_measured_on_this_machine():
    from medkd.plans.cost import measure_gmacs_per_thread

    gmacs = measure_gmacs_per_thread(threads=1, steps=1)
    assert 0.1 < gmacs < 1000  # GMAC/s of one CPU thread: plausible, not a constant
