"""Whole-slice 2D inference: pad to a multiple of the largest stride, forward, crop back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

import medkd.models.padding as padding
from medkd.engine.inference import Predictor, checkpoint_whole_slice, predict_probabilities
from medkd.models import create, forward_padded, largest_stride
from medkd.storage import save_checkpoint


class PointwiseWithStride(nn.Module):
    """Logits depend on each pixel alone, yet the network down-samples by 4 (so it needs sizes divisible by 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 3, 1)
        self.pool = nn.AvgPool2d(4)
        self.up = nn.Upsample(scale_factor=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + 0.0 * self.up(self.pool(x))


def _manual_padded(model, x, divisor):
    """Reference: zero-pad centred (extra zero after), forward, crop back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    out = model(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return out[..., ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]


def test_largest_stride_is_measured_once_per_model(monkeypatch):
    model = PointwiseWithStride()
    assert largest_stride(model, 2, 1) == 4
    assert largest_stride(create("unet", 2, 1, 4, preset="student"), 2, 1) == 16
    monkeypatch.setattr(padding, "list_tappable", lambda *a, **k: pytest.fail("stride measured again"))
    assert largest_stride(model, 2, 1) == 4


@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (1, 1), (17, 16)])
def test_whole_slice_equals_the_network_on_the_unpadded_slice(shape):
    torch.manual_seed(0)
    model = PointwiseWithStride().eval()
    image = torch.randn(1, 3, *shape)  # (C, z, y, x): three slices
    probs = predict_probabilities(model, image, mode="2d", patch_size=[16, 16], whole_slice=True)
    expected = torch.softmax(model.head(image.permute(1, 0, 2, 3)), dim=1).permute(1, 0, 2, 3)
    assert probs.shape == (3, 3, *shape)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    mirrored = predict_probabilities(model, image, mode="2d", patch_size=[16, 16], whole_slice=True, tta=True)
    torch.testing.assert_close(mirrored, expected, rtol=0, atol=1e-6)  # a pointwise net is flip-equivariant


@pytest.mark.parametrize("shape", [(45, 70), (33, 33), (80, 64)])
def test_whole_slice_equals_padded_forward_and_crop(shape):
    torch.manual_seed(1)
    model = create("unet", 2, 1, 4, preset="student").eval()
    image = torch.randn(1, 5, *shape)
    probs = predict_probabilities(model, image, mode="2d", patch_size=[32, 32], whole_slice=True, batch_size=8)
    with torch.no_grad():
        expected = torch.softmax(_manual_padded(model, image.permute(1, 0, 2, 3), 16), dim=1).permute(1, 0, 2, 3)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_whole_slice_mirroring_tta_averages_the_four_mirrorings():
    torch.manual_seed(2)
    model = create("unet", 2, 1, 4, preset="student").eval()
    image = torch.randn(1, 2, 27, 41)
    probs = predict_probabilities(model, image, mode="2d", patch_size=[32, 32], whole_slice=True, tta=True)
    slices = image.permute(1, 0, 2, 3)
    expected = torch.zeros(2, 4, 27, 41)
    with torch.no_grad():
        for axes in [(), (2,), (3,), (2, 3)]:
            flipped = torch.flip(slices, axes) if axes else slices
            out = torch.softmax(_manual_padded(model, flipped, 16), dim=1)
            expected += (torch.flip(out, axes) if axes else out) / 4
    torch.testing.assert_close(probs, expected.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-6)


def test_sliding_window_is_kept_on_request_and_in_3d():
    torch.manual_seed(3)
    model = create("unet", 2, 1, 4, preset="student").eval()
    image = torch.randn(1, 2, 48, 48)
    windowed = predict_probabilities(model, image, mode="2d", patch_size=[32, 32], whole_slice=False)
    with torch.no_grad():
        expected = torch.softmax(sliding_window_inference(image.permute(1, 0, 2, 3), [32, 32], 8, model,
                                                          overlap=0.5, mode="gaussian"), dim=1)
    torch.testing.assert_close(windowed, expected.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-6)
    model3d = create("unet", 3, 1, 4, preset="student").eval()
    volume = torch.randn(1, 16, 32, 32)
    a, b = (predict_probabilities(model3d, volume, mode="3d", patch_size=[16, 32, 32], whole_slice=w)
            for w in (True, False))
    assert torch.equal(a, b)


def test_forward_padded_crops_deep_supervision_stacks():
    stacked = forward_padded(lambda x: torch.stack([x, 2 * x], dim=1), torch.ones(2, 3, 5, 7), 4)
    assert stacked.shape == (2, 2, 3, 5, 7) and torch.equal(stacked[:, 1], torch.full((2, 3, 5, 7), 2.0))


def test_predictor_follows_the_run_unless_told(tmp_path, phantoms_2d):
    from medkd.data.dataset import load_dataset
    from medkd.data.preprocess import make_plan

    dataset = load_dataset(phantoms_2d)
    plan = make_plan(dataset, dataset.training[:2], mode="2d")
    model = create("unet", 2, 1, dataset.num_classes, preset="student")
    state = {"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
             "preprocessing": {"plan": plan.to_dict(), "patch_size": [32, 32]}, "labels": dict(dataset.labels)}
    save_checkpoint(state, tmp_path / "old.pt")  # no config at all: the sliding window, the default
    save_checkpoint({**state, "config": {"data": {"whole_slice_inference": True}}}, tmp_path / "ws.pt")
    assert not checkpoint_whole_slice({}) and not Predictor(tmp_path / "old.pt").whole_slice
    assert checkpoint_whole_slice({"config": {"data": {"whole_slice_inference": True}}})
    assert not checkpoint_whole_slice({"config": {"data": {"mode": "2d"}}})  # a run from before the option
    assert Predictor(tmp_path / "ws.pt").whole_slice
    assert not Predictor(tmp_path / "ws.pt", whole_slice=False).whole_slice
    assert Predictor(tmp_path / "old.pt", whole_slice=True).whole_slice


@pytest.mark.parametrize("flag,expected", [([], False), (["--no-whole-slice"], False), (["--whole-slice"], True)])
def test_predict_cli_passes_the_whole_slice_choice(tmp_path, phantoms_2d, monkeypatch, flag, expected):
    from typer.testing import CliRunner

    import medkd.engine.inference as inference
    from medkd.cli import app
    from medkd.data.dataset import load_dataset
    from medkd.data.preprocess import make_plan

    dataset = load_dataset(phantoms_2d)
    model = create("unet", 2, 1, dataset.num_classes, preset="student")
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                     "preprocessing": {"plan": make_plan(dataset, dataset.training[:2], mode="2d").to_dict(),
                                       "patch_size": [32, 32]}, "labels": dict(dataset.labels)}, tmp_path / "m.pt")
    seen = []
    original = inference.predict_probabilities
    monkeypatch.setattr(inference, "predict_probabilities",
                        lambda *a, **k: seen.append(k["whole_slice"]) or original(*a, **k))
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(tmp_path / "m.pt"), "-i",
                                      str(phantoms_2d / "imagesTs"), "-o", str(tmp_path / "out"), *flag])
    assert result.exit_code == 0, result.output
    assert seen == [expected, expected]
