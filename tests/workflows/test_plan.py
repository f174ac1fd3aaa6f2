"""`medkd plan`: a table and a plans file from a dataset; bad input gets one error naming the case, no file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.data.dataset import DatasetError, load_dataset
from medkd.data.io import Geometry, write_image

runner = CliRunner()


def _dataset(root, images: dict, ending=".png"):
    """A one-channel nnU-Net dataset with ``{case: (image, label)}``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, (image, label) in images.items():
        geometry = Geometry.default(image.ndim)
        write_image(image, geometry, root / "imagesTr" / f"{case}_0000{ending}")
        write_image(label, geometry, root / "labelsTr" / f"{case}{ending}")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1},
                                                   "numTraining": len(images), "file_ending": ending}))
    return root


def _plan(dataset, out, tmp_path):
    return runner.invoke(app, ["plan", str(dataset), "-o", str(out), "--cache-dir", str(tmp_path / "cache")])


def test_plan_writes_plans_and_prints_a_table(phantoms_3d, tmp_path):
    out = tmp_path / "plans.json"
    result = _plan(phantoms_3d, out, tmp_path)
    assert result.exit_code == 0, result.output
    plans = json.loads(out.read_text())
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    full = plans["configurations"]["3d_fullres"]
    assert full["target_spacing"] == [2.5, 1.0, 1.0] and full["normalization"] == ["zscore"]
    assert plans["fingerprint"]["num_cases"] == 6 and "lesion" in plans["fingerprint"]["class_frequencies"]
    for needle in ("3d_fullres", "patch", "batch", "teacher", "student", "traded", "class voxel frequencies"):
        assert needle in result.output
    cached = list((tmp_path / "cache").glob("*_fingerprint_*.json"))
    assert len(cached) == 1  # the fingerprint is cached and reused
    again = _plan(phantoms_3d, out, tmp_path)
    assert again.exit_code == 1 and "exists" in again.output


def _constant_copy(src, dst):
    shutil.copytree(src, dst)
    for path in (dst / "imagesTr").iterdir():
        write_image(np.full((64, 64), 7, np.uint8), Geometry.default(2), path)
    return dst


def test_bad_input_gets_one_error_naming_the_case_and_no_file(phantoms_2d, tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((6, 6), np.uint8)
    label[2:4, 2:4] = 1
    cases = {
        "empty": _dataset(tmp_path / "empty", {}),
        "tiny_case": _dataset(tmp_path / "tiny", {"tiny_case": ((rng.random((6, 6)) * 200 + 1).astype(np.uint8),
                                                                label)}),
        "channel 0 (MRI) is constant": _constant_copy(phantoms_2d, tmp_path / "constant"),
    }
    for needle, dataset in cases.items():
        out = tmp_path / f"{dataset.name}.json"
        result = _plan(dataset, out, tmp_path)
        assert result.exit_code == 1, result.output
        assert needle in result.output or (needle == "empty" and "no training cases" in result.output)
        assert not out.exists()


def test_zero_spacing_file_is_named_and_negative_spacing_refused(tmp_path, monkeypatch):
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_FLOAT\n"
              "ElementSpacing = 0 1 1\nElementDataFile = LOCAL\n").encode()
    root = _dataset(tmp_path / "zero", {"zcase": (np.random.default_rng(0).random((16, 16, 16)).astype(np.float32),
                                                  np.ones((16, 16, 16), np.uint8))}, ending=".mha")
    image = root / "imagesTr" / "zcase_0000.mha"
    image.write_bytes(header + np.random.default_rng(0).random(16 ** 3).astype(np.float32).tobytes())
    result = _plan(root, tmp_path / "z.json", tmp_path)
    assert result.exit_code == 1 and "zcase_0000.mha" in result.output and "spacing" in result.output
    assert not (tmp_path / "z.json").exists()

    import medkd.data.fingerprint as fingerprint

    info = load_dataset(root)
    negative = Geometry((1.0, 1.0, -2.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    monkeypatch.setattr(fingerprint, "read_case", lambda case, ds: (np.ones((1, 16, 16, 16)) * np.arange(16),
                                                                    np.ones((16, 16, 16), np.int64), negative))
    with pytest.raises(DatasetError, match="case zcase .*spacing"):
        fingerprint.compute_fingerprint(info)


def test_latency_ladder_names_the_widest_student_within_the_budget(phantoms_2d, tmp_path):
    from medkd.workflows.latency_ladder import configuration_ladder, ladder_verdict
    from medkd.workflows.plan import make_plans

    plans = make_plans(phantoms_2d, cache_dir=tmp_path / "cache")
    generous = configuration_ladder(plans, "2d", 1e9, repeats=1)
    rungs = generous["rungs"]
    assert [r["shrink"] for r in rungs] == list(range(7)) and generous["widest"]["shrink"] == 0
    assert [r["preset"] for r in rungs] == ["teacher"] + ["student"] * 6  # timed as they would be trained
    assert all(a["parameters"] > b["parameters"] for a, b in zip(rungs, rungs[1:4]))
    assert all(r["ms_per_case"] == r["ms_per_window"] * generous["windows_per_case"] for r in rungs)
    assert {r["engine"] for r in rungs} == {"onnx"}
    between = (rungs[0]["ms_per_case"] + min(r["ms_per_case"] for r in rungs)) / 2
    picked = configuration_ladder(plans, "2d", between, repeats=1, engine="torch")
    assert picked["widest"] is None or all(r["ms_per_case"] > between for r in picked["rungs"]
                                           if r["shrink"] < picked["widest"]["shrink"])
    none = configuration_ladder(plans, "2d", 1e-6, repeats=1, engine="torch")
    assert none["widest"] is None and "no rung meets" in ladder_verdict(none)
    bad = runner.invoke(app, ["plan", str(phantoms_2d), "--latency-ms", "0", "--cache-dir", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "--latency-ms" in bad.output
