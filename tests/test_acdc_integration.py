"""A few checks on the real ACDC data in ../shared/data/ACDC (skipped when it is not there)."""

from __future__ import annotations

import pytest

from pathlib import Path

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC"

pytestmark = [pytest.mark.acdc, pytest.mark.skipif(not (ACDC / "dataset.json").is_file(),
                                                   reason=f"ACDC dataset not found at {ACDC}")]


def test_acdc_passes_the_dataset_checks():
    from medkd.data.validate import check_dataset

    assert check_dataset(ACDC) == []


def test_acdc_trains_a_few_steps(tmp_path):
    from medkd.config import build_config
    from medkd.engine.trainer import train

    cfg = build_config({
        "data": {"dataset": str(ACDC), "patch_size": [128, 128], "batch_size": 4, "num_workers": 0,
                 "data_fraction": 0.03, "cache_dir": str(tmp_path / "cache"), "check": False},
        "model": {"name": "unet", "preset": "student"},
        "train": {"max_steps": 3, "val_max_cases": 2, "progress": False, "tensorboard": False},
    })
    result = train(cfg, tmp_path / "run")
    assert result.steps == 3 and len(result.last_val) == 3
