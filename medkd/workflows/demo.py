"""``medkd demo``: the whole pipeline on synthetic phantoms on a CPU (43 minutes measured on a shared 2-core VM).

The demo shows the setting where distillation pays: **few labelled cases, many unlabelled images**.

1. write a seeded 2D multi-site phantom dataset (nnU-Net raw format); only ``DEMO_LABELED`` of the
   training cases keep their labels, the others are used as unlabelled images;
2. train a teacher (UNet at a quarter of the teacher preset's width, ``shrink=2``, 407k parameters)
   on the labelled cases and a small student (UNet with widths / 16, ``shrink=4``, 27k parameters,
   15x fewer) on the same labels;
3. distil the same student from the teacher with ``balanced-kd`` (class-balanced KL and soft Dice, so
   the lesion of a few voxels counts as much as the organ) and with plain ``logit-kd`` (voxel-averaged
   KL, which lets the small student drop the lesion: the demo shows why the balance matters); teacher
   outputs are cached for every training image, labelled or not, so a step costs about what a
   labels-only step costs; every student row gets the same number of optimiser steps, and the table
   shows the time each took (feature recipes such as ``reco-kd`` run the teacher live and are left to
   the benchmarks);
4. predict the held-out cases with each, evaluate (Dice, HD95) and time CPU inference per case;
5. print one comparison table, then for each recipe the paired difference to the labels-only student
   (Wilcoxon over the held-out cases), the fraction of the teacher-student gap it closes, the
   difference per class, and plainly whether it wins or loses; ``summary.csv`` / ``summary.json``
   hold the table.

Budgets are optimiser steps, not minutes, so the demo reaches the same result on a fast or a busy
machine (only the time column changes).
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medkd.config import build_config
from medkd.data.dataset import load_dataset
from medkd.engine.inference import Predictor, group_channel_files, predict_folder
from medkd.engine.trainer import train
from medkd.evaluation import evaluate_folder
from medkd.evaluation.latency import pipeline_latency_ms
from medkd.evaluation.report import comparison_table, write_csv, write_json
from medkd.evaluation.stats import case_mean_dice, paired_comparison
from medkd.models import count_parameters

DEMO_CASES = {"num_train": 48, "num_test": 40}  # 40 held out: a paired test on 12 had little power
DEMO_LABELED = 3  # training cases that keep their labels; the other 35 of fold 0 are unlabelled images
DEMO_RECIPES = ("balanced-kd", "logit-kd")


MODELS = [("teacher", {"name": "unet", "preset": "teacher", "shrink": 2}),
          ("student", {"name": "unet", "preset": "student", "shrink": 4})]


def _train_config(dataset: Path, model: dict[str, Any], steps: int, cache: Path) -> dict[str, Any]:
    return {
        "data": {"dataset": str(dataset), "mode": "2d", "patch_size": [96, 96], "batch_size": 16,
                 "num_workers": 1, "cache_dir": str(cache), "num_folds": 5, "labeled_cases": DEMO_LABELED},
        "model": model,
        "train": {"max_steps": steps, "lr": 3e-3, "val_every": 200, "checkpoint_every": 200,
                  "val_max_cases": 4, "tensorboard": False, "seed": 0},
    }


def _evaluate_model(name: str, checkpoint: Path, dataset_root: Path, out: Path) -> dict[str, Any]:
    dataset = load_dataset(dataset_root)
    predictor = Predictor(checkpoint)
    predict_folder(predictor, dataset_root / "imagesTs", out / "predictions" / name)
    result = evaluate_folder(out / "predictions" / name, dataset_root / "labelsTs",
                             {v: k for k, v in dataset.labels.items()})
    result.save(out / "predictions" / name / "evaluation")
    summary = result.summary()
    files = list(group_channel_files(dataset_root / "imagesTs", predictor.num_channels).values())
    row = {"model": name, "params": count_parameters(predictor.model),
           "latency_ms": pipeline_latency_ms(predictor, files),
           "mean_dice": summary["mean_foreground"]["dice_mean"], "hd95": summary["mean_foreground"]["hd95_mean"]}
    for cls in dataset.class_names[1:]:
        row[f"dice_{cls}"] = summary[cls]["dice_mean"]
    return row


def _train_all(data: Path, out: Path, teacher_steps: int, student_steps: int, recipes: tuple[str, ...],
               console: Console) -> list[tuple[str, Path]]:
    """Teacher and student on the labelled cases, then the student distilled with each recipe; (row, best.pt)."""
    from medkd.recipes import load_recipe

    rows = []
    budgets = {"teacher": teacher_steps, "student": student_steps}
    for name, model in MODELS:
        console.print(f"[bold]2/3[/] training the {name} on the {DEMO_LABELED} labelled cases ({budgets[name]} steps)")
        cfg = build_config(_train_config(data, model, budgets[name], out / "cache"))
        rows.append((name, train(cfg, out / name).run_dir / "best.pt"))
    for recipe in recipes:
        spec = load_recipe(recipe)
        source = "cached teacher outputs" if spec.uses_cache else "live teacher"
        console.print(f"[bold]2/3[/] distilling the student with {recipe} on labelled + unlabelled images "
                      f"({student_steps} steps, {source})")
        tree = _train_config(data, dict(MODELS)["student"], student_steps, out / "cache")
        tree["distill"] = {"teacher": str(rows[0][1]), "recipe": spec.model_dump(mode="json")}
        rows.append((f"student+{recipe}", train(build_config(tree), out / f"student_{recipe}").run_dir / "best.pt"))
    return rows


def _class_deltas(rows: dict[str, dict[str, Any]], name: str) -> str:
    """Per-class Dice differences of row ``name`` to the labels-only student, e.g. ``organ +0.011``."""
    keys = [k for k in rows["student"] if k.startswith("dice_")]
    return ", ".join(f"{k[5:]} {rows[name][k] - rows['student'][k]:+.3f}" for k in keys)


def verdicts(out: Path, table_rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per distilled row: paired Δ to labels-only, Wilcoxon p, gap closed, per-class
    differences, and whether it wins or loses."""
    rows = {row["model"]: row for row in table_rows}
    per_case = {name: case_mean_dice(out / "predictions" / name / "evaluation" / "per_case.csv") for name in rows}
    teacher = float(np.mean(list(per_case["teacher"].values())))
    lines = []
    for name in [n for n in rows if n.startswith("student+")]:
        stats = paired_comparison(per_case["student"], per_case[name], teacher=teacher)
        gap = ("the teacher is not better than labels alone: no gap to close" if np.isnan(stats["gap_closed"])
               else f"closes {stats['gap_closed']:.0%} of the teacher-student gap")
        numbers = (f"mean Dice {stats['other']:.3f} vs {stats['baseline']:.3f} on labels alone "
                   f"(Δ {stats['delta']:+.3f}, better on {stats['wins']}/{stats['n']} cases, "
                   f"Wilcoxon p={stats['p_value']:.2g}; {gap}; per class: {_class_deltas(rows, name)})")
        if stats["delta"] <= 0:
            lines.append(f"[red]{name} LOSES[/] to the labels-only student: {numbers}")
        elif stats["p_value"] < 0.05:
            lines.append(f"[green]{name} wins[/]: {numbers}")
        else:
            lines.append(f"[yellow]{name} is ahead but not significantly[/]: {numbers}")
    return lines


def run_demo(out_root: Path, teacher_steps: int = 800, student_steps: int = 800,
             console: Console | None = None, recipes: tuple[str, ...] = DEMO_RECIPES) -> Path:
    """Run the demo into a new ``out_root/demo-<time>`` folder and return it."""
    from medkd.data.phantoms import make_phantoms

    console = console or Console()
    out = Path(out_root) / datetime.datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    started = time.monotonic()
    data = make_phantoms(out / "data" / "Dataset001_Phantoms2D", spatial_dims=2, seed=0, **DEMO_CASES)
    console.print(f"[bold]1/3[/] phantoms written to {data}; {DEMO_LABELED} training cases keep their labels, "
                  "the others are unlabelled images")
    rows = _train_all(data, out, teacher_steps, student_steps, recipes, console)
    console.print("[bold]3/3[/] predicting and evaluating the held-out cases")
    table_rows = [_evaluate_model(name, ckpt, data, out) for name, ckpt in rows]
    for row, (name, ckpt) in zip(table_rows, rows):
        result = json.loads((ckpt.parent / "result.json").read_text())
        row["steps"], row["train_min"] = result["steps"], result["elapsed_s"] / 60
    class_names = load_dataset(data).class_names[1:]
    columns = [("model", "model", "s"), ("params", "params", ",d"), ("steps", "steps", ",d"),
               ("train_min", "train min", ".1f")]
    columns += [(f"dice_{c}", f"Dice {c}", ".3f") for c in class_names]
    columns += [("mean_dice", "mean Dice", ".3f"), ("hd95", "HD95", ".2f"), ("latency_ms", "CPU ms/case", ".1f")]
    title = (f"medkd demo: {DEMO_LABELED} labelled training cases, {DEMO_CASES['num_test']} held-out phantoms, "
             "equal steps per student")
    console.print(comparison_table(table_rows, columns, title=title))
    for line in verdicts(out, table_rows):
        console.print(line, soft_wrap=True)
    console.print(f"(one seed on {DEMO_CASES['num_test']} synthetic cases: benchmarks/ gives seeds and paired tests "
                  "on real data)")
    write_csv(table_rows, out / "summary.csv")
    write_json(table_rows, out / "summary.json")
    console.print(f"everything is in {out} ({time.monotonic() - started:.0f} s)")
    return out
