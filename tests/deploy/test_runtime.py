"""The bundle predictor: same labels as `medkd predict --checkpoint`, no PyTorch, clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medkd.cli import app
from medkd.data.io import read_image
from medkd.deploy.runtime import BundlePredictor
from medkd.engine.inference import Predictor, predict_folder, read_case
from medkd.models import list_models
from medkd.workflows.export import export_bundle

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _agreement(a_dir: Path, b_dir: Path) -> float:
    """Fraction of voxels with equal labels over all files of ``a_dir``; geometry must match exactly."""
    same = total = 0
    for path in sorted(p for p in a_dir.iterdir() if p.is_file() and p.suffix != ".npz"):
        a, geo_a = read_image(path)
        b, geo_b = read_image(b_dir / path.name)
        assert a.shape == b.shape and a.dtype == b.dtype and geo_a == geo_b, path.name
        same, total = same + int((a == b).sum()), total + a.size
    return same / total


def test_bundle_and_checkpoint_cli_agree_2d(run_2d, bundle_2d, phantoms_2d, tmp_path):
    """Trained 2D student with post-processing, PNG in and out."""
    for flag, model, out in [("--checkpoint", run_2d / "best.pt", "pt"), ("--bundle", bundle_2d, "onnx")]:
        result = runner.invoke(app, ["predict", flag, str(model), "-i", str(phantoms_2d), "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(p.name for p in (tmp_path / "pt").iterdir())
    assert all(p.suffix == ".png" for p in (tmp_path / "onnx").iterdir())
    assert _agreement(tmp_path / "pt", tmp_path / "onnx") >= 0.999


def test_bundle_and_checkpoint_agree_3d_with_resampling_and_geometry(run_3d, bundle_3d, phantoms_3d, tmp_path, rotated_copies):
    """Trained 3D dynunet (deep supervision in training) on a resampled grid; inputs with a rotated direction."""
    images = rotated_copies(phantoms_3d / "imagesTs", tmp_path / "images")
    predict_folder(Predictor(run_3d / "best.pt"), images, tmp_path / "pt", save_probs=True)
    predict_folder(BundlePredictor(bundle_3d), images, tmp_path / "onnx", save_probs=True)
    assert _agreement(tmp_path / "pt", tmp_path / "onnx") >= 0.999
    for npz in (tmp_path / "pt").glob("*.npz"):
        a = np.load(npz)["probabilities"].astype(np.float32)
        b = np.load(tmp_path / "onnx" / npz.name)["probabilities"].astype(np.float32)
        assert np.abs(a - b).max() < 2e-3  # float16 storage


@pytest.mark.parametrize("mode", ["2d", "3d"])
@pytest.mark.parametrize("name", list_models())
def test_every_architecture_predicts_alike(name, mode, phantoms_3d, tmp_path, untrained_checkpoint):
    spacing = [2.0, 1.3, 1.1] if mode == "3d" else [2.0, 0.8, 0.9]
    ckpt = untrained_checkpoint(name, phantoms_3d, tmp_path / "m.pt", mode, target_spacing=spacing)
    bundle = export_bundle(ckpt, tmp_path / "b", latency_repeats=1).bundle
    torch_predictor, onnx_predictor = Predictor(ckpt), BundlePredictor(bundle)
    for files in [sorted((phantoms_3d / "imagesTs").iterdir())[:1]]:
        image, geometry = read_case(files)
        expected, got = torch_predictor.predict_arrays(image, geometry), onnx_predictor.predict_arrays(image, geometry)
        assert np.abs(expected - got).max() < 1e-4
        assert (torch_predictor.segment(expected) == onnx_predictor.segment(got)).mean() >= 0.999


@pytest.mark.parametrize("tta,whole_slice", [(True, False), (False, True)])
def test_tta_and_whole_slices_agree(run_2d, bundle_2d, phantoms_2d, tta, whole_slice):
    image, geometry = read_case(sorted((phantoms_2d / "imagesTs").iterdir())[:1])
    expected = Predictor(run_2d / "best.pt", tta=tta, whole_slice=whole_slice).predict_arrays(image, geometry)
    got = BundlePredictor(bundle_2d, tta=tta, whole_slice=whole_slice).predict_arrays(image, geometry)
    assert np.abs(expected - got).max() < 1e-4


NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    attempts = []
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "monai", "lightning_fabric"):
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: as on a torch-free install)", name=name)
    sys.meta_path.insert(0, Refuse())
    from medkd.cli import app
    try:
        app(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai"))
    print("ATTEMPTS", attempts, "LOADED", loaded)
    sys.exit(code or (1 if attempts or loaded else 0))
""")


def test_the_bundle_predictor_never_imports_torch(bundle_2d, phantoms_2d, tmp_path):
    out = tmp_path / "out"
    result = _without_torch("predict", "--bundle", str(bundle_2d), "-i", str(phantoms_2d), "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ATTEMPTS [] LOADED []" in result.stdout
    assert len(list(out.glob("*.png"))) == 2


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_a_torch_free_install_reports_a_damaged_bundle_without_importing_torch(bundle_2d, phantoms_2d, tmp_path):
    bundle = _copy(bundle_2d, tmp_path / "bundle")
    (bundle / "model.onnx").unlink()
    result = _without_torch("predict", "--bundle", str(bundle), "-i", str(phantoms_2d), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "model.onnx: missing from the bundle" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ATTEMPTS [] LOADED []" in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_torch_free_install_names_the_extra_a_training_command_needs(phantoms_2d, tmp_path):
    result = _without_torch("train", "--dataset", str(phantoms_2d), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "`medkd train` needs torch" in result.stderr and "pip install 'medkd[train]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _copy(bundle: Path, to: Path) -> Path:
    to.mkdir()
    for path in bundle.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def _predict(bundle: Path, images: Path, out: Path):
    return runner.invoke(app, ["predict", "--bundle", str(bundle), "-i", str(images), "-o", str(out)])


@pytest.mark.parametrize("damage,needle", [
    ("delete model.onnx", "model.onnx: missing from the bundle"),
    ("delete plan.json", "plan.json: missing"),
    ("flip model.onnx", "model.onnx: altered since export"),
    ("append README.md", "README.md: altered since export"),
    ("edit plan.json", "plan.json: altered since export"),
    ("garble plan.json", "plan.json: unreadable"),
])
def test_a_damaged_bundle_is_refused_naming_the_file(bundle_2d, phantoms_2d, tmp_path, damage, needle):
    bundle = _copy(bundle_2d, tmp_path / "bundle")
    action, name = damage.split()
    path = bundle / name
    if action == "delete":
        path.unlink()
    elif action == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif action == "append":
        path.write_text(path.read_text() + "\nedited\n")
    elif action == "edit":
        plan = json.loads(path.read_text())
        plan["preprocessing"]["normalization"] = ["none"]
        path.write_text(json.dumps(plan))
    else:
        path.write_text("{not json")
    result = _predict(bundle, phantoms_2d, tmp_path / "out")
    assert result.exit_code == 1
    assert needle in result.output.replace("\n", "") and str(bundle) in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()


def test_an_image_with_other_channels_is_refused_naming_the_file(bundle_3d, phantoms_3d, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((phantoms_3d / "imagesTs").iterdir())[0]
    two = sitk.JoinSeries([sitk.ReadImage(str(source))] * 2)  # a 4D NIfTI: 2 channels in one file
    sitk.WriteImage(two, str(images / "case_0000.nii.gz"))
    result = _predict(bundle_3d, images, tmp_path / "out")
    assert result.exit_code == 1 and "case_0000.nii.gz" in result.output
    assert "3D images" in result.output.replace("\n", " ") and not (tmp_path / "out").exists()
    (images / "case_0000.nii.gz").unlink()
    sitk.WriteImage(sitk.ReadImage(str(source)), str(images / "case_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(source)), str(images / "case_0001.nii.gz"))
    result = _predict(bundle_3d, images, tmp_path / "out")
    assert result.exit_code == 1 and "case_0001.nii.gz" in result.output and "takes 1 channel" in result.output
    assert not (tmp_path / "out").exists()


def test_a_2d_image_for_a_3d_bundle_is_refused_naming_the_file(bundle_3d, phantoms_2d, tmp_path):
    result = _predict(bundle_3d, phantoms_2d, tmp_path / "out")
    assert result.exit_code == 1
    text = result.output.replace("\n", "")
    assert "_0000.png" in text and "a 3d model takes 3D images; this case is 2D" in text
    assert not (tmp_path / "out").exists()


def test_a_bundle_refuses_another_device(bundle_2d, phantoms_2d, tmp_path):
    result = runner.invoke(app, ["predict", "--bundle", str(bundle_2d), "-i", str(phantoms_2d), "-o",
                                 str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 1 and "CPU" in result.output
    both = runner.invoke(app, ["predict", "-i", str(phantoms_2d), "-o", str(tmp_path / "o")])
    assert both.exit_code == 1 and "--checkpoint" in both.output and "--bundle" in both.output
