"""nnU-Net's preprocessing as medkd re-implements it (medkd.data.nnunet_preprocess): formulas, round trips,
and parity with nnunetv2's own DefaultPreprocessor and export functions where nnunetv2 is installed."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from medkd.data.io import Geometry
from medkd.data.nnunet_plans import preprocessing_entry, resolve_configuration
from medkd.data.nnunet_preprocess import (nnunet_normalize, nnunet_to_preprocessed_grid, preprocess_nnunet,
                                          resample_data_or_seg, restore_nnunet_probabilities)
from tests.nnunet_results import dataset_json, plans

SCHEMES = ["ZScoreNormalization", "CTNormalization", "RescaleTo01Normalization", "NoNormalization"]


def _volume(seed: int = 0, shape=(7, 30, 26)) -> tuple[np.ndarray, np.ndarray]:
    """A (1, z, y, x) image with a zero border (so cropping matters) and its label (z, y, x)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((1, *shape), np.float32)
    image[:, 1:-1, 3:-2, 2:-4] = rng.normal(100, 30, (1, shape[0] - 2, shape[1] - 5, shape[2] - 6))
    label = np.zeros(shape, np.int16)
    label[2:5, 8:20, 6:15] = 1
    label[3:4, 10:14, 8:12] = 2
    return image, label


def _plan(scheme: str, mask: bool = False, transpose=(0, 1, 2), configuration="3d_fullres",
          spacing_3d=(1.2, 0.7, 0.9)) -> tuple[dict, dict]:
    full = plans(scheme=scheme, transpose=transpose, spacing_3d=spacing_3d)
    full["configurations"]["3d_fullres"]["use_mask_for_norm"] = [mask]
    full["configurations"]["2d"]["use_mask_for_norm"] = [mask]
    return full, preprocessing_entry(full, resolve_configuration(full, configuration), 1)


def _geometry(spacing_xyz=(0.8, 0.75, 3.0)) -> Geometry:
    return Geometry(spacing=spacing_xyz, origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))


def test_normalisation_formulas():
    rng = np.random.default_rng(1)
    image = rng.normal(50, 10, (1, 4, 8, 8)).astype(np.float32)
    mask = np.zeros((4, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    _, plan = _plan("ZScoreNormalization")
    z = nnunet_normalize(image, mask, plan)[0]
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    _, plan = _plan("ZScoreNormalization", mask=True)
    zm = nnunet_normalize(image, mask, plan)[0]
    assert abs(zm[mask].mean()) < 1e-4 and np.array_equal(zm[~mask], image[0][~mask])  # outside left as is
    _, plan = _plan("CTNormalization")
    ct = nnunet_normalize(image, mask, plan)[0]
    expected = (np.clip(image[0], 0.1, 1.0) - 0.55) / 0.2
    np.testing.assert_allclose(ct, expected, rtol=1e-6)
    _, plan = _plan("RescaleTo01Normalization")
    r = nnunet_normalize(image, mask, plan)[0]
    assert r.min() == 0 and abs(r.max() - 1) < 1e-6
    _, plan = _plan("NoNormalization")
    assert np.array_equal(nnunet_normalize(image, mask, plan), image)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_preprocess_then_restore_is_the_original_grid(transpose):
    image, label = _volume()
    _, plan = _plan("ZScoreNormalization", transpose=transpose)
    prepared, seg, props = preprocess_nnunet(image, label, _geometry(), plan)
    assert prepared.dtype == np.float32 and seg.shape == (1, *prepared.shape[1:])
    # the cropped, transposed shape resampled from spacing (3.0, 0.75, 0.8) (z, y, x) to (1.2, 0.7, 0.9)
    cropped = [props["cropped_shape"][i] for i in range(3)]
    spacing_t = [[3.0, 0.75, 0.8][a] for a in transpose]
    target = plan["spacing"]
    assert list(prepared.shape[1:]) == [round(s * c / t) for s, c, t in zip(spacing_t, cropped, target)]
    onehot = np.stack([seg[0] == k for k in range(3)]).astype(np.float32)
    back = restore_nnunet_probabilities(onehot, props, image.shape[1:])
    assert back.shape == (3, *image.shape[1:])
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)
    agree = (back.argmax(0) == label).mean()
    assert agree > 0.97, agree  # labels survive the trip there and back (resampling blurs borders only)
    there = nnunet_to_preprocessed_grid(back, props)
    assert there.shape == onehot.shape


def test_native_2d_image_and_2d_configuration():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 40, 36)).astype(np.float32)
    full = plans(spacing_2d=(0.5, 0.5))
    plan = preprocessing_entry(full, full["configurations"]["2d"], 1)
    geometry = Geometry(spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    prepared, _, props = preprocess_nnunet(image, None, geometry, plan)
    assert prepared.shape == (1, 1, 80, 72) and props["spacing_zyx"][0] == 999.0
    back = restore_nnunet_probabilities(np.ones((2, 1, 80, 72), np.float32) / 2, props, image.shape[1:])
    assert back.shape == (2, 40, 36)


def test_anisotropic_resampling_is_in_plane_then_nearest_along_z():
    data = np.arange(2 * 4 * 6, dtype=np.float64).reshape(1, 2, 4, 6)
    out = resample_data_or_seg(data, (4, 4, 6), (4.0, 1.0, 1.0), (2.0, 1.0, 1.0), order=3, order_z=0,
                               force_separate_z=None)
    # z doubled by nearest neighbour: slices repeat exactly
    np.testing.assert_array_equal(out[0, 0], data[0, 0])
    np.testing.assert_array_equal(out[0, 1], data[0, 0])
    np.testing.assert_array_equal(out[0, 3], data[0, 1])


# ----------------------------------------------------------------------------- parity with nnunetv2


@pytest.fixture(scope="module")
def nnunetv2_api():
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed: parity with nnU-Net's own preprocessing "
                                           "is checked only where it is (the formulas above are always checked)")
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return DefaultPreprocessor, PlansManager, convert_predicted_logits_to_segmentation_with_correct_shape


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", [("3d_fullres", (0, 1, 2), False), ("3d_fullres", (2, 0, 1), True),
                                  ("2d", (0, 1, 2), False), ("3d_lowres", (1, 0, 2), False)])
def test_preprocessing_matches_nnunetv2(nnunetv2_api, scheme, case):
    preprocessor_cls, plans_manager_cls, _ = nnunetv2_api
    configuration, transpose, mask = case
    full, plan = _plan(scheme, mask=mask, transpose=transpose, configuration=configuration)
    image, label = _volume(seed=5)
    ours, our_seg, _ = preprocess_nnunet(image, label, _geometry(), plan)
    manager = plans_manager_cls(copy.deepcopy(full))
    theirs, their_seg, _ = preprocessor_cls(verbose=False).run_case_npy(
        image.copy(), label[None].copy(), {"spacing": [3.0, 0.75, 0.8]}, manager,
        manager.get_configuration(configuration), dataset_json())
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    their_seg = np.where(their_seg < 0, 0, their_seg)  # nnU-Net marks outside-the-mask background -1
    assert (our_seg == their_seg).mean() > 0.999


def test_restore_matches_nnunetv2_export(nnunetv2_api):
    preprocessor_cls, plans_manager_cls, export = nnunetv2_api
    import torch

    full, plan = _plan("ZScoreNormalization", transpose=(2, 0, 1))
    image, label = _volume(seed=6)
    prepared, _, props = preprocess_nnunet(image, None, _geometry(), plan)
    logits = np.random.default_rng(0).normal(size=(3, *prepared.shape[1:])).astype(np.float32)
    manager = plans_manager_cls(copy.deepcopy(full))
    configuration = manager.get_configuration("3d_fullres")
    _, _, their_props = preprocessor_cls(verbose=False).run_case_npy(
        image.copy(), None, {"spacing": [3.0, 0.75, 0.8]}, manager, configuration, dataset_json())
    labels = manager.get_label_manager({"labels": {"background": 0, "a": 1, "b": 2}})
    seg, probs = export(torch.from_numpy(logits), manager, configuration, labels, their_props,
                        return_probabilities=True, num_threads_torch=1)
    # nnU-Net resamples logits, then the softmax; medkd resamples log-probabilities: the same (module docstring)
    ours = restore_nnunet_probabilities(torch.softmax(torch.from_numpy(logits), 0).numpy(), props, image.shape[1:])
    assert ours.shape == probs.shape
    np.testing.assert_allclose(ours, probs, atol=1e-5)
    assert np.array_equal(ours.argmax(0), seg)
