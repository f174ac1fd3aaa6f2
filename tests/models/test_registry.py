"""Tests for medkd.models.registry: every entry, presets, spec round-trip, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from medkd.models import ModelSpec, count_parameters, create, create_from_spec, list_models, scale_channels
from medkd.models.registry import register_model

EXPECTED = ["attentionunet", "basicunet", "dynunet", "nnunet", "segresnet", "unet"]


def test_list_models_contains_all_entries():
    assert list_models() == sorted(list_models())
    assert set(EXPECTED) <= set(list_models())


@pytest.mark.parametrize("name", EXPECTED)
def test_forward_2d_teacher_and_student(name):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 32, 32)
    for preset in ("teacher", "student"):
        model = create(name, 2, 2, 3, preset=preset).eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, 3, 32, 32), (name, preset)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", EXPECTED)
def test_forward_3d_student(name):
    x = torch.randn(1, 1, 16, 32, 32)
    model = create(name, 3, 1, 4, preset="student").eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 4, 16, 32, 32)


@pytest.mark.parametrize("name", EXPECTED)
def test_student_is_much_smaller(name):
    teacher = count_parameters(create(name, 2, 1, 3))
    student = count_parameters(create(name, 2, 1, 3, preset="student"))
    assert student * 10 <= teacher, (name, teacher, student)


def test_unet_student_widths_and_ratio():
    teacher = create("unet", 2, 1, 2)
    student = create("unet", 2, 1, 2, preset="student")
    assert teacher.channels == (32, 64, 128, 256, 512)
    assert student.channels == (4, 8, 16, 32, 64)
    assert student.strides == teacher.strides
    assert count_parameters(teacher) >= 10 * count_parameters(student)
    # same depth: one conv per block in both (only widths differ)
    n_conv = lambda m: sum(isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) for mod in m.modules())  # noqa: E731
    assert n_conv(teacher) == n_conv(student)


def test_explicit_shrink_overrides_preset():
    model = create("unet", 2, 1, 2, preset="student", shrink=1)
    assert model.channels == (16, 32, 64, 128, 256)
    assert model.medkd_spec.shrink == 1 and model.medkd_spec.preset == "student"


def test_basicunet_and_segresnet_scaling():
    bu = create("basicunet", 2, 1, 2, preset="student")
    assert bu.conv_0.conv_0.conv.out_channels == 4
    assert bu.final_conv.in_channels == 4
    seg = create("segresnet", 2, 1, 2, preset="student")
    assert seg.init_filters == 4
    dyn = create("dynunet", 2, 1, 2, preset="student")
    assert list(dyn.filters) == [4, 8, 16, 32, 40]
    assert min(dyn.filters) >= 4


def test_dynunet_depth_and_deep_supervision():
    model = create("dynunet", 2, 1, 3, deep_supervision=True, preset="student", depth=4)
    assert len(model.filters) == 4
    x = torch.randn(2, 1, 32, 32)
    model.train()
    y = model(x)
    assert y.shape == (2, 3, 3, 32, 32)  # (B, K = depth - 1, C, H, W)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 32, 32)


def test_deep_supervision_rejected_for_other_models():
    with pytest.raises(ValueError, match="deep_supervision"):
        create("unet", 2, 1, 2, deep_supervision=True)


@pytest.mark.parametrize("name", EXPECTED)
def test_spec_round_trip(name):
    model = create(name, 2, 1, 3, preset="student")
    spec = model.medkd_spec
    assert isinstance(spec, ModelSpec)
    d = json.loads(json.dumps(spec.to_dict()))  # plain, serialisable
    clone = create_from_spec(d)
    sd_a, sd_b = model.state_dict(), clone.state_dict()
    assert list(sd_a) == list(sd_b)
    assert all(sd_a[k].shape == sd_b[k].shape for k in sd_a)
    clone.load_state_dict(sd_a)
    assert ModelSpec.from_dict(d) == ModelSpec.from_dict(spec.to_dict())


def test_spec_kwargs_round_trip():
    model = create("unet", 2, 1, 2, preset="student", channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
    assert model.channels == (4, 4, 8)
    clone = create_from_spec(model.medkd_spec.to_dict())
    assert clone.channels == model.channels
    assert list(clone.state_dict()) == list(model.state_dict())


def test_unet_student_preset_uses_relu_and_writes_it_into_the_spec():
    student = create("unet", 2, 1, 2, preset="student")
    acts = {type(m).__name__ for m in student.modules() if isinstance(m, (nn.ReLU, nn.PReLU))}
    assert acts == {"ReLU"} and student.medkd_spec.kwargs == {"act": "relu"}
    teacher = create("unet", 2, 1, 2, preset="teacher")
    assert any(isinstance(m, nn.PReLU) for m in teacher.modules()) and teacher.medkd_spec.kwargs == {}
    chosen = create("unet", 2, 1, 2, preset="student", act="prelu")  # kwargs win over the preset's
    assert any(isinstance(m, nn.PReLU) for m in chosen.modules())
    assert create("basicunet", 2, 1, 2, preset="student").medkd_spec.kwargs == {}  # only unet has PReLU
    student_3d = create("unet", 3, 1, 2, preset="student")  # 3D students keep PReLU (learned worse with ReLU)
    assert any(isinstance(m, nn.PReLU) for m in student_3d.modules()) and student_3d.medkd_spec.kwargs == {}


def test_spec_without_act_rebuilds_the_prelu_student_of_older_checkpoints():
    old = create("unet", 2, 1, 2, preset="student", act="prelu")
    spec = old.medkd_spec.to_dict()
    del spec["kwargs"]["act"]  # a checkpoint written when PReLU was the student preset's activation
    clone = create_from_spec(spec)
    clone.load_state_dict(old.state_dict())
    assert any(isinstance(m, nn.PReLU) for m in clone.modules())


def test_scale_channels():
    assert scale_channels((32, 64, 128, 256, 512), 3) == (4, 8, 16, 32, 64)
    assert scale_channels((32, 64), 0) == (32, 64)
    assert scale_channels((32, 320), 4) == (4, 20)
    assert scale_channels((32,), 5, min_channels=2) == (2,)
    with pytest.raises(ValueError):
        scale_channels((32,), -1)


def test_unknown_name_and_preset_errors():
    with pytest.raises(ValueError, match="unet"):  # lists the available names
        create("nope", 2, 1, 2)
    with pytest.raises(ValueError, match="teacher"):
        create("unet", 2, 1, 2, preset="huge")
    with pytest.raises(ValueError, match="spatial_dims"):
        create("unet", 4, 1, 2)
    with pytest.raises(ValueError, match="Unknown ModelSpec keys"):
        ModelSpec.from_dict({"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "foo": 1})
    with pytest.raises(ValueError, match="available models"):
        create_from_spec({"name": "nope", "spatial_dims": 2, "in_channels": 1, "out_channels": 2})


def test_register_model_custom_and_duplicate():
    name = "_test_tiny_conv"
    if name not in list_models():

        @register_model(name)
        def _tiny(spec: ModelSpec) -> nn.Module:
            conv = nn.Conv2d if spec.spatial_dims == 2 else nn.Conv3d
            return conv(spec.in_channels, spec.out_channels, 1)

    model = create(name, 2, 3, 5)
    assert model.medkd_spec.name == name
    assert model(torch.zeros(1, 3, 4, 4)).shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_model(name)(lambda spec: nn.Identity())
