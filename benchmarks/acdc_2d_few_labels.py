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
* with ``--full-teacher BEST_PT`` (or a teacher set folder, such as an imported nnU-Net model): the same
  recipes from a teacher trained on *all* labels (as when a user distils another site's model or their own
  nnU-Net), reported as separate rows (their gap closed is to that teacher);
* with ``--ensemble N``: a uniform ensemble of ``N`` teachers (UNet at width ``--member-shrink``, seeds
  0..N-1, ``--member-steps`` each) trained on the same labelled cases, scored as one model (mean of the
  members' probabilities), and ``--ensemble-recipes`` distilled from it (cached ensemble outputs; gap
  closed is to the ensemble).

With ``--minutes M`` the labels-only student and each recipe (own teacher) are also trained for ``M``
minutes of wall-clock each (equal-time rows, compared with the equal-time labels-only rows); run them on a
quiet machine, since the steps reached depend on the load.

Statistics: per seed the paired difference of mean test Dice to labels-only; per case (40 test
volumes, Dice averaged over seeds) the two-sided Wilcoxon signed-rank test; the fraction of the
teacher-student gap closed. Finished runs are reused (restartable). Not a test.

    python benchmarks/acdc_2d_few_labels.py --labeled-fraction 0.1 --teacher-minutes 12 --steps 2000 --seeds 0 1 2 \
        --recipes logit-kd pseudo-kd --full-teacher RUN/best.pt --full-teacher-recipes pseudo-kd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from medkd.config import build_config
from medkd.engine.ensemble import load_predictor
from medkd.evaluation.report import comparison_table, write_csv, write_json
from medkd.recipes import load_recipe
from medkd.workflows.teacher_plan import make_plan
from medkd.workflows.train_teachers import train_teacher_set

from acdc_2d_distill import COLUMNS, scored, summary_row, teacher_row
from acdc_2d_supervised import DEFAULT_DATA, newest_input, run_config, test_scores

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


def ensemble_teacher(args) -> Path:
    """Train (or finish) the uniform ensemble of ``--ensemble`` members on the labelled cases; its folder."""
    tree = teacher_tree(args)
    tree["model"]["shrink"] = args.member_shrink
    tree["train"].update(max_time_min=None, max_steps=args.member_steps, val_every=args.member_steps // 4,
                         checkpoint_every=args.member_steps // 4)
    folder = args.out / "ensemble"
    if (folder / "postprocessing.json").is_file():  # written after the last member: a finished set, reused as is
        return folder                             # (e.g. linked from another --out, whose cache path differs)
    plan = make_plan("uniform", build_config(tree), members=args.ensemble)
    train_teacher_set(folder, plan, resume=(folder / "plan.json").is_file())
    return folder


def set_score(args, name: str, folder: Path, steps: int) -> dict:
    """A teacher set (``folder`` holds its teachers.json) on the test cases, with the keys of :func:`scored`
    that the teacher row reads (``steps`` as given: a set has no run of its own)."""
    row = test_scores(name, load_predictor(folder), args.data, args.out,
                      reuse_after=newest_input(folder / "teachers.json"))
    return {**row, "steps": steps, "val_dice": float("nan")}


def full_teacher_score(args) -> dict:
    """``--full-teacher`` on the test cases: a run's best.pt (scored with its run folder) or a teacher set folder
    (e.g. made by `medkd import-nnunet`; steps 0: trained elsewhere)."""
    if args.full_teacher.is_file():
        return scored(args.data, args.out, "teacher_full", args.full_teacher.parent, None)
    return set_score(args, "teacher_full", args.full_teacher, steps=0)


def student_tree(args, seed: int, teacher: Path | None, recipe: str | None, minutes: float | None = None) -> dict:
    """The student (UNet width t=``--shrink``); ``--steps`` steps, or ``minutes`` of wall-clock when given."""
    tree = run_config(args.data, "student", None, args.out / "cache", seed)
    tree["model"]["shrink"] = args.shrink
    if args.student_kwargs:
        tree["model"]["kwargs"] = {**tree["model"].get("kwargs", {}), **args.student_kwargs}
    tree["data"]["augment"] = {"flip_prob": 0.0}
    tree["train"].update(max_time_min=minutes, max_steps=None if minutes else args.steps, val_every=args.val_every,
                         checkpoint_every=args.val_every, num_threads=args.threads, val_max_cases=None)
    if recipe is not None:
        tree["distill"] = {"teacher": str(teacher), "recipe": load_recipe(recipe).model_dump(mode="json")}
    return few_label_data(tree, args)


def student_rows(args, teachers: dict[str, Path]) -> dict[tuple[str, str | None], list[dict]]:
    """Runs per (row, teacher tag): labels only, then every recipe from every teacher, seed by seed."""
    rows: dict[tuple[str, str | None], list[dict]] = {("labels only", None): []}
    for seed in args.seeds:
        rows["labels only", None].append({**scored(args.data, args.out, f"labels_seed{seed}",
                                                   args.out / f"labels_seed{seed}", student_tree(args, seed, None, None)),
                                           "seed": seed})
        for tag, teacher in teachers.items():
            own = tag == f"teacher {args.labeled_fraction:.0%}"
            if tag == "teacher 100%" and seed not in (args.full_teacher_seeds or args.seeds):
                continue
            recipes = {"teacher 100%": args.full_teacher_recipes, "ensemble": args.ensemble_recipes}.get(tag)
            for recipe in args.recipes if own else (recipes or args.recipes):
                name = f"{recipe}_{tag}_seed{seed}"  # e.g. "logit-kd_teacher 10%_seed0"
                rows.setdefault((f"{recipe} ({tag})", tag), []).append(
                    {**scored(args.data, args.out, name, args.out / name, student_tree(args, seed, teacher, recipe)),
                     "seed": seed})
    for seed in args.seeds if args.minutes else []:  # equal wall-clock: labels only and each own-teacher recipe
        for recipe in [None, *(args.time_recipes or args.recipes)]:
            name = f"{recipe or 'labels'}_time{args.minutes:g}min_seed{seed}"
            tree = student_tree(args, seed, teachers[f"teacher {args.labeled_fraction:.0%}"] if recipe else None,
                                recipe, minutes=args.minutes)
            rows.setdefault((f"{recipe or 'labels only'} ({args.minutes:g} min)", None), []).append(
                {**scored(args.data, args.out, name, args.out / name, tree), "seed": seed})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--labeled-fraction", type=float, default=0.1)
    parser.add_argument("--unlabeled-ratio", type=float, default=0.5)
    parser.add_argument("--teacher-minutes", type=float, default=12.0)
    parser.add_argument("--teacher-steps", type=int, default=None, help="step budget (the first budget reached ends)")
    parser.add_argument("--full-teacher", type=Path, default=None, help="best.pt of a teacher trained on all labels, "
                        "or a teacher set folder (e.g. an nnU-Net model imported with `medkd import-nnunet`)")
    parser.add_argument("--full-teacher-recipes", nargs="+", default=None, help="recipes distilled from the "
                        "full teacher (default: --recipes)")
    parser.add_argument("--full-teacher-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    parser.add_argument("--ensemble", type=int, default=0, help="members of a uniform ensemble trained on the "
                        "labelled cases (0: none)")
    parser.add_argument("--member-shrink", type=int, default=2, help="width reduction of each ensemble member")
    parser.add_argument("--member-steps", type=int, default=2000)
    parser.add_argument("--ensemble-recipes", nargs="+", default=None, help="recipes distilled from the ensemble "
                        "(default: --recipes)")
    parser.add_argument("--shrink", type=int, default=4, help="student UNet width reduction t (4: 26,609 parameters)")
    parser.add_argument("--student-kwargs", type=json.loads, default=None, help="JSON of extra constructor "
                        "arguments of every student, e.g. '{\"act\": \"relu\"}' (use another --out)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=None, help="also train labels-only and each recipe for this "
                        "wall-clock budget (equal-time rows; run on a quiet machine)")
    parser.add_argument("--time-recipes", nargs="+", default=None, help="recipes of the equal-time rows "
                        "(default: --recipes)")
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="*", default=["logit-kd"], help="recipes distilled from the own teacher "
                        "(none given: only labels-only and the other teachers' rows)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_few_labels"))
    args = parser.parse_args()
    own = f"teacher {args.labeled_fraction:.0%}"
    scores = {own: scored(args.data, args.out, "teacher", args.out / "teacher", teacher_tree(args))}
    teachers = {own: args.out / "teacher" / "best.pt"}
    if args.full_teacher:
        teachers["teacher 100%"] = args.full_teacher
        scores["teacher 100%"] = full_teacher_score(args)
    if args.ensemble:
        teachers["ensemble"] = ensemble_teacher(args)
        scores["ensemble"] = set_score(args, "ensemble", teachers["ensemble"], steps=args.member_steps)
    rows = student_rows(args, teachers)
    base = rows["labels only", None]
    table = [{**teacher_row(score), "row": tag} for tag, score in scores.items()]
    timed = rows.get((f"labels only ({args.minutes:g} min)", None)) if args.minutes else None
    table += [summary_row(label, runs, timed if label.endswith(" min)") else base, scores[tag or own])
              for (label, tag), runs in rows.items()]
    write_json({"teachers": scores, "rows": {label: runs for (label, _), runs in rows.items()}}, args.out / "runs.json")
    write_csv(table, args.out / "summary.csv")
    title = (f"ACDC 2D, {args.labeled_fraction:.0%} of training cases labelled, student UNet t={args.shrink}, "
             f"{args.steps} steps, 40 test cases")
    Console(width=220).print(comparison_table(table, COLUMNS, title=title))


if __name__ == "__main__":
    main()
