"""ACDC 2D teacher sets: ensembles vs their members, students distilled from ensembles, subset teachers.

Every teacher (member) gets the same budget (``--member-steps`` optimiser steps, batch 8, UNet-family
networks at half the teacher width, ``--member-shrink 1``); every student the same as in
``acdc_2d_distill.py`` (UNet student preset, batch 16, ``--student-steps``). All rows are scored on the
40 held-out test volumes.

(a) a uniform ensemble (3 UNets, seeds 0-2) and a diverse one (UNet, BasicUNet, SegResNet x Dice+CE, CE)
    against each of their members;
(b) students distilled from each ensemble with ``--ensemble-recipes`` (default ``ensemble-kd``: cached
    ensemble probabilities) against the student on labels alone, ``--seeds`` each (paired differences);
(c) three subset teachers, each trained on its own third of the training cases, against one of them,
    their ensemble, and the student distilled from them with ``adaptive-multi-teacher``.
Step time with 1, 3 and 5 teachers, live and cached, is ``teacher_step_time.py``.

    python benchmarks/acdc_2d_teachers.py --member-steps 600 --student-steps 400 --seeds 0 1 2

Finished runs are reused (restartable). Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console

from medkd.config import build_config
from medkd.engine.ensemble import load_predictor
from medkd.evaluation.report import comparison_table, write_json
from medkd.teachers.manifest import load_manifest
from medkd.workflows.teacher_plan import make_plan
from medkd.workflows.train_teachers import train_teacher_set

from acdc_2d_distill import student_config, train_once
from acdc_2d_supervised import DEFAULT_DATA, newest_input, run_config, test_scores

CLASSES = ("RV", "MYO", "LV")
SETS = {"uniform": {"members": 3}, "diverse": {}, "subset": {"subsets": 3}}


def member_base(args) -> dict:
    tree = run_config(args.data, "teacher", None, args.out / "cache", seed=0, augment=False, batch_size=8)
    tree["model"]["shrink"] = args.member_shrink
    tree["train"].update(max_steps=args.member_steps, max_time_min=None, val_every=args.member_steps // 2,
                         checkpoint_every=args.member_steps // 2)
    return tree


def train_sets(args) -> dict[str, Path]:
    base = build_config(member_base(args))
    folders = {}
    for kind in args.sets:
        folder = args.out / "teachers" / kind
        resume = (folder / "plan.json").is_file()
        train_teacher_set(folder, make_plan(kind, base, **SETS[kind]), resume=resume)
        folders[kind] = folder
    return folders


def score(args, name: str, path: Path, cache: dict) -> dict:
    if name not in cache:
        checkpoint = path if path.suffix == ".pt" else path / "teachers.json"
        cache[name] = test_scores(name, load_predictor(path), args.data, args.out, reuse_after=newest_input(checkpoint))
    return cache[name]


def student(args, name: str, seed: int, teacher: Path | None, recipe: str | None) -> dict:
    run_dir = (args.labels_dir or args.out / "students") / f"{name}_seed{seed}"
    if recipe is not None:
        run_dir = args.out / "students" / f"{name}_seed{seed}"
    tree = student_config(args.data, args.out / "cache", seed, steps=args.student_steps, minutes=None,
                          val_every=args.student_steps // 2, teacher=teacher, recipe=recipe)
    result = train_once(tree, run_dir)
    row = test_scores(f"student_{name}_seed{seed}", load_predictor(run_dir / "best.pt"), args.data, args.out,
                      reuse_after=newest_input(run_dir / "best.pt"))
    return {**row, "seed": seed, "steps": result["steps"], "s_per_step": result["elapsed_s"] / result["steps"]}


def summarise(name: str, runs: list[dict], labels: dict[int, dict] | None) -> dict:
    def stat(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    row = {"model": name, "n": len(runs), "mean_dice": stat("mean_dice"), "hd95": stat("hd95")}
    row.update({f"dice_{c}": stat(f"dice_{c}") for c in CLASSES})
    if labels:
        paired = [r["mean_dice"] - labels[r["seed"]]["mean_dice"] for r in runs]
        row["delta"] = f"{np.mean(paired):+.3f} ± {np.std(paired):.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_teachers"))
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--member-steps", type=int, default=600)
    parser.add_argument("--member-shrink", type=int, default=1)
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-dir", type=Path, default=None,
                        help="reuse labels-only students from acdc_2d_distill.py (e.g. bench_runs/acdc_2d_distill/steps)"
                             " when --student-steps and --seeds match")
    parser.add_argument("--ensemble-recipes", nargs="+", default=["ensemble-kd"],
                        help="recipes distilled from each ensemble (cached)")
    parser.add_argument("--adaptive-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    args = parser.parse_args()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"ACDC not found at {args.data} (expected nnU-Net raw format with dataset.json)")
    console = Console(width=200)
    folders = train_sets(args)
    scores: dict[str, dict] = {}
    rows = []
    for kind, folder in folders.items():  # (a) and (c): members, then the set as one model
        for member in load_manifest(folder).members:
            rows.append({**score(args, f"{kind}/{member.name}", member.checkpoint, scores), "n": 1, "set": kind})
        rows.append({**score(args, f"{kind}/ensemble", folder, scores), "n": 1, "set": kind})
    columns = [("model", "model", "s"), *[(f"dice_{c}", f"Dice {c}", ".3f") for c in CLASSES],
               ("mean_dice", "mean Dice", ".3f"), ("hd95", "HD95", ".2f")]
    console.print(comparison_table(rows, columns, title=f"ACDC 2D teachers ({args.member_steps} steps each), 40 test cases"))
    labels = {seed: student(args, "labels", seed, None, None) for seed in args.seeds}
    students = [summarise("student, labels only", list(labels.values()), labels)]
    for kind in [k for k in ("uniform", "diverse") if k in folders]:
        for recipe in args.ensemble_recipes:
            runs = [student(args, f"{recipe}_{kind}", seed, folders[kind], recipe) for seed in args.seeds]
            students.append(summarise(f"student, {recipe} from {kind}", runs, labels))
    if "subset" in folders:
        runs = [student(args, "adaptive_subset", seed, folders["subset"], "adaptive-multi-teacher")
                for seed in args.adaptive_seeds or args.seeds]
        students.append(summarise("student, adaptive-multi-teacher from subset", runs, labels))
    s_columns = [("model", "student", "s"), ("n", "seeds", "d"), *[(f"dice_{c}", f"Dice {c}", "s") for c in CLASSES],
                 ("mean_dice", "mean Dice", "s"), ("delta", "Δ vs labels (paired)", "s"), ("hd95", "HD95", "s")]
    console.print(comparison_table(students, s_columns,
                                   title=f"ACDC 2D students ({args.student_steps} steps), 40 test cases"))
    write_json({"teachers": rows, "students": students}, args.out / "summary.json")


if __name__ == "__main__":
    main()
