"""ACDC 2D distillation benchmark: labels-only student vs every recipe, at equal steps and equal time.

For each seed, the student (UNet, student preset) is trained on labels alone and distilled from a
trained teacher with each recipe, twice: with the same number of optimiser steps for every row
(``--steps``) and with the same wall-clock budget (``--minutes``). Every run is evaluated on the 40
held-out test volumes. The table gives per-class Dice and HD95 as mean ± std over seeds, the paired
difference of mean Dice to the labels-only student of the same seed, and the time per training step
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
from medkd.recipes import list_recipes, load_recipe

from acdc_2d_supervised import DEFAULT_DATA, run_config, test_scores

CLASSES = ("RV", "MYO", "LV")


def student_config(data: Path, cache: Path, seed: int, *, steps: int | None, minutes: float | None, val_every: int,
                   teacher: Path | None = None, recipe: str | None = None) -> dict:
    """The benchmark student (UNet student preset, batch 16, no mirroring), on labels or distilled."""
    tree = run_config(data, "student", minutes, cache, seed)
    tree["train"].update(max_time_min=minutes, max_steps=steps, val_every=val_every, checkpoint_every=val_every)
    tree["data"]["augment"] = {"flip_prob": 0.0}
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


def run_one(args, row: str, seed: int, budget: str) -> dict:
    run_dir = args.out / budget / f"{row}_seed{seed}"
    tree = student_config(args.data, args.out / "cache", seed, steps=args.steps if budget == "steps" else None,
                          minutes=args.minutes if budget == "time" else None, val_every=args.val_every,
                          teacher=args.teacher, recipe=None if row == "labels" else row)
    result = train_once(tree, run_dir)
    metrics = test_scores(f"{budget}_{row}_seed{seed}", Predictor(run_dir / "best.pt"), args.data, args.out,
                          reuse_after=run_dir / "best.pt")
    return {**metrics, "row": row, "seed": seed, "budget": budget, "steps": result["steps"],
            "s_per_step": result["elapsed_s"] / max(result["steps"], 1)}


def summarise(runs: list[dict], budget: str, rows: list[str]) -> list[dict]:
    by_key = {(r["row"], r["seed"]): r for r in runs if r["budget"] == budget}
    seeds = sorted({seed for _, seed in by_key})
    base_step = np.mean([by_key[("labels", s)]["s_per_step"] for s in seeds])
    table = []
    for row in rows:
        runs_row = [by_key[(row, s)] for s in seeds]
        paired = [by_key[(row, s)]["mean_dice"] - by_key[("labels", s)]["mean_dice"] for s in seeds]
        entry = {"row": row, "budget": budget, "seeds": len(seeds),
                 "steps": int(np.mean([r["steps"] for r in runs_row])),
                 "step_time_rel": np.mean([r["s_per_step"] for r in runs_row]) / base_step,
                 "mean_dice": f"{np.mean([r['mean_dice'] for r in runs_row]):.3f} ± {np.std([r['mean_dice'] for r in runs_row]):.3f}",
                 "delta": f"{np.mean(paired):+.3f} ± {np.std(paired):.3f}",
                 "hd95": f"{np.mean([r['hd95'] for r in runs_row]):.2f} ± {np.std([r['hd95'] for r in runs_row]):.2f}"}
        for cls in CLASSES:
            values = [r[f"dice_{cls}"] for r in runs_row]
            entry[f"dice_{cls}"] = f"{np.mean(values):.3f} ± {np.std(values):.3f}"
        table.append(entry)
    return table


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
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_distill"))
    args = parser.parse_args()
    rows = ["labels", *args.recipes]
    runs = [run_one(args, row, seed, budget) for budget in args.budgets for seed in args.seeds for row in rows]
    write_json(runs, args.out / "runs.json")
    console = Console(width=200)
    columns = [("row", "student", "s"), ("steps", "steps", ",d"), ("step_time_rel", "step time x", ".2f")]
    columns += [(f"dice_{c}", f"Dice {c}", "s") for c in CLASSES]
    columns += [("mean_dice", "mean Dice", "s"), ("delta", "Δ vs labels (paired)", "s"), ("hd95", "HD95", "s")]
    for budget in args.budgets:
        table = summarise(runs, budget, rows)
        write_csv(table, args.out / f"summary_{budget}.csv")
        title = f"ACDC 2D students, 40 test cases, equal {'steps' if budget == 'steps' else 'wall-clock time'}"
        console.print(comparison_table(table, columns, title=title))


if __name__ == "__main__":
    main()
