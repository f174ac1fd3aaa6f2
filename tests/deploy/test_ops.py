"""The numpy re-implementations of medkd.deploy.ops against the PyTorch/MONAI originals they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from monai.transforms import Resize

from medkd.data.dataset import load_dataset, read_case
from medkd.data.preprocess import make_plan, preprocess_arrays, restore_probabilities
from medkd.deploy import ops
from medkd.engine.inference import predict_probabilities
from medkd.models import create


@pytest.mark.parametrize("shape,target", [((2, 7, 9), (13, 4)), ((1, 5, 16, 16), (9, 16, 7)),
                                          ((3, 4, 6, 5), (4, 11, 3)), ((1, 1, 8, 8), (1, 3, 20))])
def test_resize_linear_is_monai_resize(shape, target):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mode = "bilinear" if len(target) == 2 else "trilinear"
    expected = np.asarray(Resize(target, mode=mode)(torch.as_tensor(array)))
    np.testing.assert_allclose(ops.resize_linear(array, target), expected, atol=1e-5)


@pytest.mark.parametrize("patch", [(32, 32), (16, 24, 20), (7, 5)])
def test_gaussian_importance_is_monai_map(patch):
    expected = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, dtype=torch.float32).numpy()
    np.testing.assert_allclose(ops.gaussian_importance(patch), expected, rtol=1e-6, atol=1e-7)


def _windowed(x):  # a window-dependent function: the blending is visible in its output
    return np.concatenate([x - x.mean(axis=tuple(range(1, x.ndim)), keepdims=True), x ** 2], axis=1)


@pytest.mark.parametrize("shape,patch", [((3, 1, 40, 50), (32, 32)), ((2, 2, 20, 70), (32, 32)),
                                         ((1, 1, 18, 40, 33), (16, 32, 32)), ((1, 1, 8, 20, 64), (16, 32, 32))])
def test_sliding_window_is_monai(shape, patch):
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    expected = sliding_window_inference(torch.as_tensor(image), list(patch), 4,
                                        lambda t: torch.as_tensor(_windowed(t.numpy())), overlap=0.5, mode="gaussian")
    got = ops.sliding_window(_windowed, image, patch, batch_size=4)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(("phantoms", "mode", "spacing"), [
    ("phantoms_3d", "2d", None), ("phantoms_3d", "3d", None), ("phantoms_3d", "2d", [2.0, 1.3, 1.7]),
    ("phantoms_3d", "3d", [2.0, 1.3, 1.7]), ("phantoms_2d", "2d", [1.0, 0.7, 0.8])])  # last: native 2D
def test_preprocess_and_restore_are_the_plan(request, phantoms, mode, spacing):
    dataset = load_dataset(request.getfixturevalue(phantoms))
    plan = make_plan(dataset, dataset.training[:2], mode=mode, target_spacing=spacing)
    image, _, geometry = read_case(dataset.training[0], dataset)
    expected, _, props = preprocess_arrays(image, None, geometry, plan)
    got, mine = ops.preprocess(image, geometry, plan.to_dict())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    probs = np.random.default_rng(2).random((3, *expected.shape[1:]), dtype=np.float32)
    np.testing.assert_allclose(ops.restore(probs, mine, image.shape[1:]),
                               restore_probabilities(probs, props, image.shape[1:]), atol=1e-5)


@pytest.mark.parametrize("mode,tta,whole", [("2d", False, False), ("2d", True, True), ("3d", True, False)])
def test_predict_probabilities_is_pytorch_inference(mode, tta, whole):
    torch.manual_seed(0)
    dims = 2 if mode == "2d" else 3
    model = create("unet", dims, 1, 3, preset="student").eval()
    image = np.random.default_rng(4).normal(size=(1, 12, 40, 36) if dims == 2 else (1, 20, 40, 36)).astype(np.float32)
    patch = [32, 32] if dims == 2 else [16, 32, 32]

    def network(x):
        with torch.inference_mode():
            return model(torch.as_tensor(x)).numpy()

    expected = predict_probabilities(model, image, mode=mode, patch_size=patch, tta=tta, whole_slice=whole)
    got = ops.predict_probabilities(network, image, mode=mode, patch_size=patch, tta=tta, whole_slice=whole,
                                    divisor=16)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
