"""medkd export: ONNX parity with PyTorch for every registry architecture, the bundle's content, bad exports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.deploy.bundle import read_bundle, sha256_of_file
from medkd.deploy.export import deployable_network, export_onnx
from medkd.engine.inference import Predictor
from medkd.models import count_parameters, create, list_models
from medkd.storage import load_checkpoint
from medkd.workflows.export import export_bundle

runner = CliRunner()


def _perturbed(model):
    """Non-trivial weights everywhere (norm affine parameters too, which start at 1 and 0)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list_models())
def test_onnx_logits_match_pytorch(name, dims, tmp_path):
    """fp32 ONNX vs PyTorch within 1e-4 on inputs of another batch and spatial size than the traced one."""
    torch.manual_seed(0)
    model = _perturbed(create(name, dims, 2, 3, preset="student"))
    patch = [32, 32] if dims == 2 else [16, 32, 32]
    export_onnx(model, tmp_path / "m.onnx", (1, 2, *patch), tmp_path / "src.pt")
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims_of_input = graph.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims_of_input) if i != 1)  # batch and spatial axes are dynamic
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ([1, *patch], [3, *patch[:-1], patch[-1] + 16]):
        x = torch.randn(shape[0], 2, *shape[1:])
        with torch.no_grad():
            reference = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == reference.shape
        assert np.abs(got - reference).max() <= 1e-4


def test_bundle_holds_what_predict_uses(run_2d, bundle_2d):
    plan = read_bundle(bundle_2d)
    state = load_checkpoint(run_2d / "best.pt")
    predictor = Predictor(run_2d / "best.pt")
    assert sorted(p.name for p in bundle_2d.iterdir()) == ["README.md", "model.onnx", "plan.json"]
    assert plan["preprocessing"] == state["preprocessing"]["plan"]
    assert plan["inference"]["patch_size"] == predictor.patch_size and plan["inference"]["whole_slice"] is False
    assert plan["labels"] == predictor.labels and plan["source"]["step"] == state["step"]
    expected = predictor.postprocessing
    assert expected is not None  # the run decided one (postprocessing.json)
    assert plan["postprocessing"] == {"foreground": list(expected.foreground), "classes": list(expected.classes)}
    assert plan["model"]["parameters"] == count_parameters(predictor.model) and plan["model"]["macs_per_window"] > 0
    for name in ("model.onnx", "README.md"):
        assert plan["files"][name]["sha256"] == sha256_of_file(bundle_2d / name)
    card = (bundle_2d / "README.md").read_text()
    assert f"{plan['model']['parameters']:,}" in card and "MACs" in card and "Latency at export" in card
    assert "Test Dice: not evaluated" in card and "Teacher: none" in card


def test_card_reports_the_test_evaluation_and_teacher(run_2d, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "postprocessing.json", "result.json"):
        (run / name).write_bytes((run_2d / name).read_bytes())
    (run / "predictions" / "evaluation").mkdir(parents=True)
    (run / "predictions" / "evaluation" / "summary.json").write_text(json.dumps(
        {"organ": {"dice_mean": 0.91234}, "core": {"dice_mean": 0.8}, "mean_foreground": 0.5}))
    state = load_checkpoint(run / "best.pt")
    state["config"]["distill"] = {"teacher": "runs/teacher/best.pt", "recipe": {"name": "logit-kd"}}
    torch.save(state, run / "best.pt")
    card = (export_bundle(run, tmp_path / "b", latency_repeats=1).bundle / "README.md").read_text()
    assert "Test Dice: 0.856 mean (organ 0.912, core 0.800)" in card
    assert "Recipe: logit-kd" in card and "runs/teacher/best.pt" in card


def test_training_only_modules_are_left_out(phantoms_3d, tmp_path, make_checkpoint):
    """Distillation adapters (extra_state) and dynunet's deep-supervision heads are not in the ONNX graph."""
    model = _perturbed(create("dynunet", 3, 1, 5, preset="student", deep_supervision=True))
    adapter = {"adapter.weight": torch.randn(8, 4, 1, 1, 1)}
    ckpt = make_checkpoint(model, phantoms_3d, tmp_path / "m.pt", "3d", [16, 32, 32], extra_state=adapter)
    plan = export_bundle(ckpt, tmp_path / "b", latency_repeats=1).plan
    deployed = deployable_network(load_checkpoint(ckpt), ckpt)
    assert plan["model"]["parameters"] == count_parameters(deployed) < count_parameters(model)
    assert plan["model"]["spec"]["deep_supervision"] is False
    graph = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert not [i.name for i in graph.graph.initializer if "deep_supervision" in i.name or "adapter" in i.name]
    x = torch.randn(1, 1, 16, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - model.eval()(x).numpy()).max() <= 1e-4


def test_a_non_empty_output_is_refused_unless_forced(phantoms_2d, tmp_path, untrained_checkpoint):
    ckpt = untrained_checkpoint("unet", phantoms_2d, tmp_path / "m.pt", "2d")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out)])
    assert result.exit_code == 1 and "not empty" in result.output and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.onnx", "plan.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp_", ".old_"))]


def test_a_model_that_cannot_be_exported_is_named_and_nothing_is_written(phantoms_2d, tmp_path, monkeypatch,
                                                                         untrained_checkpoint):
    ckpt = untrained_checkpoint("attentionunet", phantoms_2d, tmp_path / "m.pt", "2d")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 1
    assert str(ckpt) in result.output and "cannot export" in result.output and "aten::fancy" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_bad_source_is_named(tmp_path, content):
    source = tmp_path / "best.pt"
    if content is not None:
        source.write_bytes(content)
    result = runner.invoke(app, ["export", str(source), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and str(source) in result.output
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".tmp_*"))


def test_help_is_true():
    export_help = runner.invoke(app, ["export", "--help"]).output
    assert "--force" in export_help and "--quantize" in export_help and "--fp16" in export_help
    assert "--calibration" in export_help
    assert "--bundle" in runner.invoke(app, ["predict", "--help"]).output
