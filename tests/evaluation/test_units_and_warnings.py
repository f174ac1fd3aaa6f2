"""HD95/ASD say their unit (mm with a physical spacing, px for PNG); evaluation prints no third-party warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medkd.evaluation.folder import evaluate_folder
from medkd.evaluation.results import EvaluationResult

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fixture,unit", [("phantoms_2d", "px"), ("phantoms_3d", "mm")])
def test_distance_unit_follows_the_images(fixture, unit, request, tmp_path):
    dataset = request.getfixturevalue(fixture)
    result = evaluate_folder(dataset / "labelsTs", dataset / "labelsTs", {1: "organ", 2: "core", 3: "neighbour", 4: "lesion"})
    assert result.distance_unit == unit
    assert all(row["distance_unit"] == unit for row in result.per_case)
    assert result.summary()["mean_foreground"]["distance_unit"] == unit
    headers = [column.header for column in result.table().columns]
    assert f"HD95 ({unit})" in headers and f"ASD ({unit})" in headers
    paths = result.save(tmp_path)
    assert "distance_unit" in paths["summary_csv"].read_text().splitlines()[0]
    with pytest.raises(ValueError, match="distance_unit"):
        EvaluationResult([], class_names=["a"], distance_unit="inch")


def test_evaluate_prints_no_third_party_warnings(phantoms_3d, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(phantoms_3d / "labelsTs", pred)
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(REPO)}
    env.pop("MEDKD_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "medkd", "evaluate", str(pred), "--dataset", str(phantoms_3d),
                           "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "HD95 (mm)" in output
    for needle in ("FutureWarning", "DeprecationWarning", "always_return_as_numpy"):
        assert needle not in output
