"""Evaluate a folder of predicted segmentations (``medkd evaluate``) against reference labels."""

from __future__ import annotations

import json
from pathlib import Path

from medkd.evaluation import EvaluationResult, evaluate_folder


def class_names(labels_json: Path | None, ref_dir: Path) -> dict[int, str]:
    """{label value: class name} from ``labels_json``, else from ``dataset.json`` beside ``ref_dir``.

    Reads nnU-Net v2 (``{"background": 0}``) and MSD (``{"0": "background"}``) label maps.
    """
    for candidate in [labels_json, ref_dir.parent / "dataset.json"]:
        if candidate and candidate.is_file():
            labels = json.loads(candidate.read_text()).get("labels")
            if isinstance(labels, dict):
                if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background"}
                    return {int(k): v for k, v in labels.items()}
                return {int(v): k for k, v in labels.items()}
    raise FileNotFoundError(f"no class names: pass --labels DATASET.json (none found beside {ref_dir})")


def evaluate_predictions(pred_dir: Path, label_dir: Path | None = None, *, dataset: Path | None = None,
                         labels: Path | None = None, workers: int = 2) -> tuple[EvaluationResult, Path]:
    """Per-case, per-class Dice, HD95 and ASD of ``pred_dir`` against ``label_dir``.

    Without ``label_dir``, ``dataset``'s ``labelsTs``; class names from ``labels`` (a dataset.json),
    else ``dataset``'s, else the dataset.json beside the label folder. Returns the result and the
    label folder used.
    """
    if label_dir is None:
        if dataset is None:
            raise ValueError("give LABEL_DIR or --dataset")
        label_dir = dataset / "labelsTs"
    names = class_names(labels or (dataset / "dataset.json" if dataset else None), label_dir)
    return evaluate_folder(pred_dir, label_dir, names, num_workers=workers), label_dir
