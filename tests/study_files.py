"""A tiny study file on the phantoms, shared by the tests of `medkd experiment` (serial and on slots)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml


def tiny_study_file(tmp_path: Path, dataset: Path, *, recipes: Sequence[str], seeds: Sequence[int], steps: int,
                    checkpoint_every: int) -> Path:
    """``tmp_path/tiny.yaml``: a teacher of 4 steps, one UNet student (shrink 4) per recipe and seed, ``steps``
    steps each, 4 labelled cases, no workers, one thread."""
    tree = {"name": "tiny", "dataset": str(dataset),
            "data": {"mode": "2d", "patch_size": [64, 64], "batch_size": 4, "num_workers": 0},
            "train": {"val_every": 1000, "checkpoint_every": checkpoint_every, "log_every": 1, "progress": False,
                      "tensorboard": False, "num_threads": 1},
            "teacher": {"model": {"name": "unet", "preset": "student"}, "steps": 4},
            "students": [{"name": "tiny", "model": {"name": "unet", "shrink": 4}}],
            "recipes": list(recipes), "seeds": list(seeds), "budgets": [{"steps": steps}],
            "labeled_cases": [4], "latency_cases": 1}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
