"""ACDC 2D distillation benchmark: labels-only student vs every recipe, at equal steps and equal time.

For each seed, the student (UNet, student preset) is trained on labels alone and distilled from a
trained teacher with each recipe, twice: with the same number of optimiser steps for every row
(``--steps``) and with the same wall-clock budget (``--minutes``). Every run is evaluated on the 40
held-out test volumes. The table gives per-class Dice and HD95 as mean ± std over seeds, the paired
difference of mean Dice to the labels-only student of the same seed, the two-sided Wilcoxon
signed-rank p-value over the 40 test cases (per-case Dice averaged over seeds), the fraction of the
teacher-student gap closed ``(KD - labels) / (teacher - labels)``, and the time per training step
relative to labels-only training.

    python benchmarks/acdc_2d_distill.py --teacher bench_runs/acdc_2d_supervised/teacher/best.pt \
        --steps 2000 --minutes 10 --seeds 0 1 2

Runs that finished (``result.json`` present) are reused, so the script can be stopped and restarted.
Not a test: the full grid is (1 + recipes) x seeds x 2 trainings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from medkd.config import build_config
from medkd.engine.inference import Predictor
from medkd.engine.trainer import train
from medkd.evaluation.report import comparison_table, write_csv, write_json
from medkd.evaluation.stats import case_mean_dice, mean_over_runs, paired_comparison
from medkd.recipes import list_recipes, load_recipe

from acdc_2d_supervised import DEFAULT_DATA, newest_input, run_config, test_scores

CLASSES = ("RV", "MYO", "LV")


def student_config(data: Path, cache: Path, seed: int, *, steps: int | None, minutes: float | None, val_every: int,
                   teacher: Path | None = None, recipe: str | None = None, shrink: int | None = None,
                   model: str = "unet") -> dict:
    """The benchmark student (student preset or width ``shrink``, batch 16, no mirroring), on labels or distilled."""
    tree = run_config(data, "student", minutes, cache, seed)
    tree["model"]["name"] = model
    tree["train"].update(max_time_min=minutes, max_steps=steps, val_every=val_every, checkpoint_every=val_every)
    tree["data"]["augment"] = {"flip_prob": 0.0}
    if shrink is not None:
        tree["model"]["shrink"] = shrink
    if recipe is not None:
        spec = load_recipe(recipe)
        tree["distill"] = {"teacher": str(teacher), "recipe": spec.model_dump(mode="json")}
        if spec.data.data_fraction:
            tree["data"]["data_fraction"] = spec.data.data_fraction
    return tree


def train_once(tree: dict, run_dir: Path) -> dict:
    """Train (or finish, or reuse) one run; returns its result.json."""
    if not (run_dir / "result.json").is_file():
        train(build_config(tree), run_dir, resume=(run_dir / "last.pt").is_file())
    return json.loads((run_dir / "result.json").read_text())


def scored(data: Path, out: Path, name: str, run_dir: Path, tree: dict | None) -> dict:
    """Train (or reuse) one run and score it on the test cases, keeping per-case Dice for paired tests.

    ``tree`` None scores an existing run (e.g. the teacher) without training.
    """
    result = train_once(tree, run_dir) if tree is not None else json.loads((run_dir / "result.json").read_text())
    row = test_scores(name, Predictor(run_dir / "best.pt"), data, out, reuse_after=newest_input(run_dir / "best.pt"))
    per_case = case_mean_dice(out / "predictions" / name / "evaluation" / "per_case.csv")
    return {**row, "steps": result["steps"], "val_dice": result["best_metric"], "per_case": per_case,
            "s_per_step": result["elapsed_s"] / max(result["steps"], 1)}


def summary_row(label: str, runs: list[dict], base: list[dict], teacher: dict) -> dict:
    """Mean ± std over seeds, paired Δ per seed, Wilcoxon over per-case Dice (mean over seeds), gap closed.

    Every run is paired with the labels-only run of its own seed (``"seed"`` key).
    """
    is_base = runs is base
    by_seed = {b["seed"]: b for b in base}
    base = [by_seed[r["seed"]] for r in runs]
    mean = [r["mean_dice"] for r in runs]
    paired = [r["mean_dice"] - b["mean_dice"] for r, b in zip(runs, base)]
    stats = paired_comparison(mean_over_runs([b["per_case"] for b in base]),
                              mean_over_runs([r["per_case"] for r in runs]), teacher=teacher["mean_dice"])
    row = {"row": label, "seeds": len(runs), "steps": int(np.mean([r["steps"] for r in runs])),
           "step_time_rel": np.mean([r["s_per_step"] for r in runs]) / np.mean([b["s_per_step"] for b in base]),
           "val_dice": f"{np.mean([r['val_dice'] for r in runs]):.3f}",
           "mean_dice": f"{np.mean(mean):.3f} ± {np.std(mean):.3f}",
           "delta": "-" if is_base else f"{np.mean(paired):+.3f} ± {np.std(paired):.3f}",
           "p_value": "-" if is_base else f"{stats['p_value']:.2g}",
           "gap_closed": "-" if is_base else f"{stats['gap_closed']:.0%}",
           "hd95": f"{np.mean([r['hd95'] for r in runs]):.1f}"}
    for cls in CLASSES:
        row[f"dice_{cls}"] = f"{np.mean([r[f'dice_{cls}'] for r in runs]):.3f}"
    return row


def teacher_row(teacher: dict) -> dict:
    return {"row": "teacher", "seeds": 1, "steps": teacher["steps"], "val_dice": f"{teacher['val_dice']:.3f}",
            "mean_dice": f"{teacher['mean_dice']:.3f}", "hd95": f"{teacher['hd95']:.1f}",
            **{f"dice_{c}": f"{teacher[f'dice_{c}']:.3f}" for c in CLASSES}}


COLUMNS = [("row", "model", "s"), ("seeds", "seeds", "d"), ("steps", "steps", ",d"),
           ("step_time_rel", "step time x", ".2f"), ("val_dice", "val Dice", "s")]
COLUMNS += [(f"dice_{c}", f"Dice {c}", "s") for c in CLASSES]
COLUMNS += [("mean_dice", "test Dice", "s"), ("delta", "Δ paired", "s"), ("p_value", "Wilcoxon p", "s"),
            ("gap_closed", "gap closed", "s"), ("hd95", "HD95", "s")]


def run_one(args, row: str, seed: int, budget: str) -> dict:
    run_dir = args.out / budget / f"{row}_seed{seed}"
    tree = student_config(args.data, args.out / "cache", seed, steps=args.steps if budget == "steps" else None,
                          minutes=args.minutes if budget == "time" else None, val_every=args.val_every,
                          teacher=args.teacher, recipe=None if row == "labels" else row, shrink=args.shrink)
    tree["train"]["num_threads"] = args.threads
    return {**scored(args.data, args.out, f"{budget}_{row}_seed{seed}", run_dir, tree),
            "row": row, "seed": seed, "budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="teacher best.pt (e.g. from acdc_2d_supervised.py)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=2000, help="equal-steps budget per row")
    parser.add_argument("--minutes", type=float, default=10.0, help="equal-time budget per row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=[r for r in list_recipes() if r != "adaptive-multi-teacher"],
                        help="default: every shipped single-teacher recipe")
    parser.add_argument("--val-every", type=int, default=250, help="validation (and best.pt) interval in steps")
    parser.add_argument("--budgets", nargs="+", choices=["steps", "time"], default=["steps", "time"])
    parser.add_argument("--shrink", type=int, default=None, help="student UNet width reduction t (default: preset, 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_distill"))
    args = parser.parse_args()
    rows = ["labels", *args.recipes]
    teacher = scored(args.data, args.out, "teacher", args.teacher.parent, None)
    runs = [run_one(args, row, seed, budget) for budget in args.budgets for seed in args.seeds for row in rows]
    write_json({"teacher": teacher, "runs": runs}, args.out / "runs.json")
    console = Console(width=220)
    for budget in args.budgets:
        by_row = {row: [r for r in runs if r["budget"] == budget and r["row"] == row] for row in rows}
        table = [teacher_row(teacher)] + [summary_row(row, by_row[row], by_row["labels"], teacher) for row in rows]
        write_csv(table, args.out / f"summary_{budget}.csv")
        title = f"ACDC 2D students, 40 test cases, equal {'steps' if budget == 'steps' else 'wall-clock time'}"
        console.print(comparison_table(table, COLUMNS, title=title))


if __name__ == "__main__":
    main()
