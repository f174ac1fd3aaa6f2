"""benchmarks/deploy_latency.py --quick runs in seconds and reports every engine, the floor and (2D) the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dims", [2, 3])
def test_quick_latency_benchmark(tmp_path, dims):
    report = tmp_path / "latency.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "deploy_latency.py"), "--quick", "--json",
                             str(report), "--dims", str(dims)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    numbers = json.loads(report.read_text())
    assert numbers["matmul_peak_gflops"]["1"] > 0
    engines = {row["engine"] for row in numbers["rows"]}
    assert engines == {"pytorch", "ort fp32", "ort int8", "ort fp16"}
    for row in numbers["rows"]:
        assert row["ms_input"] > 0 and row["ms_volume"] > row["ms_input"] and 0 < row["floor_fraction"] < 1
        assert row["gmacs"] > 0 and (row["peak_mb"] is None or row["peak_mb"] >= 0)
    assert numbers["unit"] == {2: "256x224 slice", 3: "32x64x64 patch"}[dims] and f"{dims}D: ms per" in result.stdout
    if dims == 3:  # the pipeline is the 2D student's
        assert "pipeline" not in numbers
        return
    stages = numbers["pipeline"]["stages_ms"]["1"]
    assert set(stages) == {"read", "preprocess", "network", "windows", "restore", "segment", "write"}
    assert all(ms >= 0 for ms in stages.values())
    assert "% floor" in result.stdout and "student pipeline" in result.stdout
