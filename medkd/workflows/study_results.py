"""Evaluation of a study's runs and its three tables: ``results.csv``, ``runs.csv``, ``summary.csv``.

Each run (teacher or student) predicts the dataset's test cases (``imagesTs``) into
``eval/<run>/predictions`` and is scored against ``labelsTs`` (:func:`medkd.evaluation.evaluate_folder`);
``eval/<run>/run.json`` is written last, so a run with it is evaluated.

``results.csv``: one row per run x test case x class: ``run, role, student, method, seed, budget,
view, labels, case, class, dice, hd95, asd`` (distances in mm; NaN where exactly one mask is empty).

``runs.csv``: one row per run: its identity, ``params``, ``macs`` (one forward of a training patch,
batch 1), ``steps``, ``train_s`` (wall-clock of training), ``step_s`` (= train_s / steps),
``latency_ms`` (median CPU pipeline time per test case over the first ``latency_cases``), ``val_dice``
(best validation Dice), ``test_dice`` (mean over test cases of each case's mean foreground Dice),
``test_hd95``, ``test_asd`` (means over the finite case x class values). A given teacher's ``steps``
and ``train_s`` come from its checkpoint / ``result.json`` when available.

``summary.csv``: see :func:`medkd.workflows.study_summary.summary_rows`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medkd.evaluation.report import write_csv, write_json
from medkd.evaluation.stats import case_mean_dice
from medkd.workflows.experiment import PlannedRun
from medkd.workflows.study import Study

IDENTITY = ("run", "role", "student", "method", "seed", "budget", "view", "labels")


def identity(run: PlannedRun) -> dict[str, Any]:
    """The columns that say which run a row belongs to."""
    return {"run": run.run_id, "role": run.role, "student": run.student, "method": run.method, "seed": run.seed,
            "budget": run.budget.tag if run.budget else "given", "view": run.budget.view if run.budget else "given",
            "labels": run.labels}


def _training_record(run: PlannedRun) -> dict[str, Any]:
    """``steps``, ``train_s``, ``val_dice`` from the run's result.json (a given teacher: beside its checkpoint)."""
    result = (run.run_dir if run.run_dir else run.checkpoint.parent) / "result.json"
    if not result.is_file():
        return {"steps": math.nan, "train_s": math.nan, "val_dice": math.nan}
    data = json.loads(result.read_text())
    return {"steps": data["steps"], "train_s": data["elapsed_s"], "val_dice": data["best_metric"]}


def _complexity(predictor: Any) -> tuple[int, int]:
    """Parameters and MACs of one forward over a training patch (batch 1), summed over a teacher set's members."""
    from medkd.models import count_macs, count_parameters

    members = getattr(predictor, "members", [predictor])
    params = sum(count_parameters(m.model) for m in members)
    macs = sum(count_macs(m.model, (1, m.num_channels, *m.patch_size)) for m in members)
    return params, macs


def _test_means(per_case: list[dict[str, Any]], per_case_csv: Path) -> dict[str, float]:
    """Mean test Dice (over cases of their mean foreground Dice), HD95 and ASD (finite values) of one run."""
    dice = list(case_mean_dice(per_case_csv).values())
    out = {"test_dice": float(np.mean(dice)) if dice else math.nan}
    for metric in ("hd95", "asd"):
        values = [float(r[metric]) for r in per_case if math.isfinite(float(r[metric]))]
        out[f"test_{metric}"] = float(np.mean(values)) if values else math.nan
    return out


def evaluate_run(run: PlannedRun, study: Study) -> dict[str, Any]:
    """Predict and score the test cases with ``run``'s model, time it, and write ``eval/<run>/run.json``."""
    from medkd.data.dataset import load_dataset
    from medkd.engine.case_io import group_channel_files, predict_folder
    from medkd.engine.ensemble import load_predictor
    from medkd.evaluation import evaluate_folder
    from medkd.evaluation.latency import pipeline_latency_ms

    dataset = load_dataset(study.dataset)
    predictor = load_predictor(run.checkpoint)
    pred_dir = run.eval_dir / "predictions"
    predict_folder(predictor, study.dataset / "imagesTs", pred_dir, overwrite=True)
    result = evaluate_folder(pred_dir, study.dataset / "labelsTs", {v: k for k, v in dataset.labels.items()})
    paths = result.save(run.eval_dir)
    files = list(group_channel_files(study.dataset / "imagesTs", predictor.num_channels).values())
    params, macs = _complexity(predictor)
    record = _training_record(run)
    row = {**identity(run), "params": params, "macs": macs, **record,
           "step_s": record["train_s"] / record["steps"] if record["steps"] else math.nan,
           "latency_ms": pipeline_latency_ms(predictor, files[: study.latency_cases]),
           **_test_means(result.per_case, paths["per_case_csv"])}
    write_json(row, run.eval_dir / "run.json")
    return row


def _read_run_row(run: PlannedRun) -> dict[str, Any]:
    """run.json with JSON nulls (NaN on write) back to NaN."""
    row = json.loads((run.eval_dir / "run.json").read_text())
    return {k: (math.nan if v is None else v) for k, v in row.items()}


def result_rows(run: PlannedRun) -> list[dict[str, Any]]:
    """results.csv rows of one evaluated run (its per_case.csv with the run's identity)."""
    with open(run.eval_dir / "per_case.csv", newline="") as handle:
        return [{**identity(run), "case": r["case"], "class": r["class"], "dice": float(r["dice"]),
                 "hd95": float(r["hd95"]), "asd": float(r["asd"])} for r in csv.DictReader(handle)]


def write_outputs(out: Path, runs: list[PlannedRun], study: Study) -> list[Path]:
    """Write results.csv, runs.csv and summary.csv (atomically) from the evaluated runs; return the paths."""
    from medkd.workflows.study_summary import summary_columns, summary_rows

    done = [run for run in runs if (run.eval_dir / "run.json").is_file()]
    run_rows = [_read_run_row(run) for run in done]
    results = [row for run in done for row in result_rows(run)]
    per_case = {run.run_id: case_mean_dice(run.eval_dir / "per_case.csv") for run in done}
    summary = summary_rows(run_rows, per_case, results)
    return [write_csv(results, out / "results.csv"), write_csv(run_rows, out / "runs.csv"),
            write_csv(summary, out / "summary.csv", fieldnames=summary_columns(summary))]
