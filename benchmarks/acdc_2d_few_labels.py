"""ACDC 2D with few labels: a teacher trained on 10% of the labelled cases teaches a small student on all images.

The setting users meet most: few labelled patients, many unlabelled images. Fold 0's 140 training
cases (70 patients); ``--labeled-fraction`` of them keep their labels (whole patients, both frames:
``group_regex ^(patient\\d+)``, ``labeled_seed`` 0); the others are used as unlabelled images.

Rows (each student row: ``--seeds`` seeds, the same number of optimiser steps):
* teacher: UNet teacher preset (6.5M parameters), trained on the labelled cases only (``--teacher-minutes``);
* labels only: the student on the labelled cases (Dice+CE);
* each ``--recipes`` entry: the same student distilled from that teacher; the supervised term sees only
  labelled samples, the distillation terms every sample; ``data.unlabeled_ratio`` of each batch comes
  from the unlabelled cases; teacher outputs are cached for all training cases;
* with ``--full-teacher BEST_PT``: the same recipes from a teacher trained on *all* labels (as when a user
  distils another site's model), reported as separate rows.

Statistics: per seed the paired difference of mean test Dice to labels-only; per case (40 test
volumes, Dice averaged over seeds) the two-sided Wilcoxon signed-rank test; the fraction of the
teacher-student gap closed. Finished runs are reused (restartable). Not a test.

    python benchmarks/acdc_2d_few_labels.py --labeled-fraction 0.1 --teacher-minutes 12 --steps 2000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from medkd.engine.inference import Predictor
from medkd.evaluation.report import comparison_table, write_csv, write_json
from medkd.evaluation.stats import case_mean_dice, mean_over_runs, paired_comparison
from medkd.recipes import load_recipe

from acdc_2d_distill import train_once
from acdc_2d_supervised import DEFAULT_DATA, run_config, test_scores

CLASSES = ("RV", "MYO", "LV")
PATIENT = r"^(patient\d+)"


def few_label_data(tree: dict, args) -> dict:
    tree["data"].update(labeled_fraction=args.labeled_fraction, group_regex=PATIENT,
                        unlabeled_ratio=args.unlabeled_ratio)
    return tree


def teacher_tree(args) -> dict:
    """UNet teacher on the labelled cases; light augmentation (no mirroring) against overfitting few cases."""
    tree = run_config(args.data, "teacher", args.teacher_minutes, args.out / "cache", seed=0, batch_size=8)
    tree["train"].update(num_threads=args.threads, val_max_cases=None, max_steps=args.teacher_steps)
    return few_label_data(tree, args)


def student_tree(args, seed: int, teacher: Path | None, recipe: str | None) -> dict:
    tree = run_config(args.data, "student", None, args.out / "cache", seed)
    tree["model"]["shrink"] = args.shrink
    tree["data"]["augment"] = {"flip_prob": 0.0}
    tree["train"].update(max_time_min=None, max_steps=args.steps, val_every=args.val_every,
                         checkpoint_every=args.val_every, num_threads=args.threads, val_max_cases=None)
    if recipe is not None:
        tree["distill"] = {"teacher": str(teacher), "recipe": load_recipe(recipe).model_dump(mode="json")}
    return few_label_data(tree, args)


def scored(args, name: str, run_dir: Path, tree: dict) -> dict:
    """Train (or reuse) one run, score it on the test cases; keeps per-case Dice for the paired test."""
    result = train_once(tree, run_dir)
    row = test_scores(name, Predictor(run_dir / "best.pt"), args.data, args.out, reuse_after=run_dir / "best.pt")
    per_case = case_mean_dice(args.out / "predictions" / name / "evaluation" / "per_case.csv")
    return {**row, "steps": result["steps"], "val_dice": result["best_metric"], "per_case": per_case,
            "s_per_step": result["elapsed_s"] / max(result["steps"], 1)}


def student_rows(args, teachers: dict[str, Path]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"labels only": []}
    for seed in args.seeds:
        rows["labels only"].append(scored(args, f"labels_seed{seed}", args.out / f"labels_seed{seed}",
                                          student_tree(args, seed, None, None)))
        for tag, teacher in teachers.items():
            for recipe in args.recipes:
                name = f"{recipe}_{tag}_seed{seed}"
                rows.setdefault(f"{recipe} ({tag})", []).append(
                    scored(args, name, args.out / name, student_tree(args, seed, teacher, recipe)))
    return rows


def summary_row(label: str, runs: list[dict], base: list[dict], teacher: dict) -> dict:
    mean = [r["mean_dice"] for r in runs]
    paired = [r["mean_dice"] - b["mean_dice"] for r, b in zip(runs, base)]
    stats = paired_comparison(mean_over_runs([b["per_case"] for b in base]),
                              mean_over_runs([r["per_case"] for r in runs]), teacher=teacher["mean_dice"])
    row = {"row": label, "seeds": len(runs), "steps": int(np.mean([r["steps"] for r in runs])),
           "step_time_rel": np.mean([r["s_per_step"] for r in runs]) / np.mean([b["s_per_step"] for b in base]),
           "val_dice": f"{np.mean([r['val_dice'] for r in runs]):.3f}",
           "mean_dice": f"{np.mean(mean):.3f} ± {np.std(mean):.3f}",
           "delta": f"{np.mean(paired):+.3f} ± {np.std(paired):.3f}" if runs is not base else "-",
           "p_value": "-" if runs is base else f"{stats['p_value']:.2g}",
           "gap_closed": "-" if runs is base else f"{stats['gap_closed']:.0%}",
           "hd95": f"{np.mean([r['hd95'] for r in runs]):.1f}"}
    for cls in CLASSES:
        row[f"dice_{cls}"] = f"{np.mean([r[f'dice_{cls}'] for r in runs]):.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--labeled-fraction", type=float, default=0.1)
    parser.add_argument("--unlabeled-ratio", type=float, default=0.5)
    parser.add_argument("--teacher-minutes", type=float, default=12.0)
    parser.add_argument("--teacher-steps", type=int, default=None, help="step budget (the first budget reached ends)")
    parser.add_argument("--full-teacher", type=Path, default=None, help="best.pt of a teacher trained on all labels")
    parser.add_argument("--shrink", type=int, default=4, help="student UNet width reduction t (4: 26,609 parameters)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["logit-kd"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_few_labels"))
    args = parser.parse_args()
    teacher = scored(args, "teacher", args.out / "teacher", teacher_tree(args))
    teachers = {f"teacher {args.labeled_fraction:.0%}": args.out / "teacher" / "best.pt"}
    if args.full_teacher:
        teachers["teacher 100%"] = args.full_teacher
    rows = student_rows(args, teachers)
    base = rows["labels only"]
    table = [{"row": "teacher", "seeds": 1, "steps": teacher["steps"], "val_dice": f"{teacher['val_dice']:.3f}",
              "mean_dice": f"{teacher['mean_dice']:.3f}", "hd95": f"{teacher['hd95']:.1f}",
              **{f"dice_{c}": f"{teacher[f'dice_{c}']:.3f}" for c in CLASSES}}]
    table += [summary_row(label, runs, base, teacher) for label, runs in rows.items()]
    write_json({"teacher": teacher, "rows": rows}, args.out / "runs.json")
    write_csv(table, args.out / "summary.csv")
    columns = [("row", "model", "s"), ("seeds", "seeds", "d"), ("steps", "steps", ",d"),
               ("step_time_rel", "step time x", ".2f"), ("val_dice", "val Dice", "s")]
    columns += [(f"dice_{c}", f"Dice {c}", "s") for c in CLASSES]
    columns += [("mean_dice", "test Dice", "s"), ("delta", "Δ paired", "s"), ("p_value", "Wilcoxon p", "s"),
                ("gap_closed", "gap closed", "s"), ("hd95", "HD95", "s")]
    title = (f"ACDC 2D, {args.labeled_fraction:.0%} of training cases labelled, student UNet t={args.shrink}, "
             f"{args.steps} steps, 40 test cases")
    Console(width=220).print(comparison_table(table, columns, title=title))


if __name__ == "__main__":
    main()
