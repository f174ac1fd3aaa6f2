"""Registry model ``nnunet`` (dynamic-network-architectures) and feature taps on nnU-Net's U-Nets."""

from __future__ import annotations

import pytest
import torch

from medkd.models import count_parameters, create, create_from_spec, discover_stages, inspect_model
from medkd.models.nnunet import NnunetArchitectureError, build_nnunet_network
from medkd.storage import save_checkpoint
from tests.nnunet_results import architecture


def _entry(dims: int, residual: bool) -> dict:
    arch = architecture(dims, residual, features=(8, 16, 32, 32, 64))
    return {"network_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
            "kw_requires_import": arch["_kw_requires_import"]}


@pytest.mark.parametrize("residual", [False, True], ids=["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_stages_of_nnunet_unets_are_found(dims, residual):
    model = create("nnunet", dims, 1, 3, **_entry(dims, residual)).eval()
    stages = discover_stages(model, dims, 1)
    assert stages["encoder"] == [f"encoder.stages.{i}" for i in range(4)]
    assert stages["bottleneck"] == ["encoder.stages.4"]
    assert stages["decoder"] == [f"decoder.stages.{i}" for i in range(4)]
    x = torch.randn(1, 1, *([32] * dims))
    assert model(x).shape == (1, 3, *([32] * dims))


def test_inspect_model_takes_a_checkpoint(tmp_path):
    model = create("nnunet", 2, 2, 4, **_entry(2, True))
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict()}, tmp_path / "m.pt")
    rows, stages = inspect_model(str(tmp_path / "m.pt"))
    assert rows[0]["shape"][0] > 0 and stages["bottleneck"] == ["encoder.stages.4"]
    assert any(r["type"] == "ResidualEncoder" for r in rows)


def test_student_preset_scales_the_features():
    teacher, student = create("nnunet", 2, 1, 4), create("nnunet", 2, 1, 4, preset="student")
    assert count_parameters(teacher) > 40 * count_parameters(student)
    clone = create_from_spec(student.medkd_spec.to_dict())
    assert count_parameters(clone) == count_parameters(student)


def test_bad_entries_name_the_key():
    entry = _entry(2, False)
    with pytest.raises(NnunetArchitectureError, match="network_class_name"):
        build_nnunet_network("dynamic_network_architectures.architectures.unet.Primus", entry["arch_kwargs"], [], 1, 2)
    with pytest.raises(NnunetArchitectureError, match="arch_kwargs.conv_op"):
        build_nnunet_network(entry["network_class_name"], {**entry["arch_kwargs"], "conv_op": "builtins.eval"},
                             ["conv_op"], 1, 2)
    with pytest.raises(NnunetArchitectureError, match="arch_kwargs do not build"):
        build_nnunet_network(entry["network_class_name"], {**entry["arch_kwargs"], "n_stages": 9},
                             entry["kw_requires_import"], 1, 2)
    with pytest.raises(ValueError, match="deep supervision"):
        create("nnunet", 2, 1, 4, deep_supervision=True)
