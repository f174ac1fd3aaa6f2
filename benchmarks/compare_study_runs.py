"""Compare two students of one study, recipe by recipe, paired per test case.

A study (``medkd experiment``) compares each recipe with labels-only for the same student; this script
compares two *students* trained the same way, e.g. one network with two activations
(``studies/phantoms-student-act.yaml``). For every method both students ran (labels-only included), at the
same labelled setting and budget, and on the seeds both have, it averages each case's foreground Dice over
the seeds and runs the paired Wilcoxon test of :func:`medkd.evaluation.stats.paired_comparison`
(B against A: delta = B - A). It reads the study's ``runs.csv`` and each run's ``eval/<run>/per_case.csv``
(what ``medkd experiment`` wrote); nothing is trained.

    python benchmarks/compare_study_runs.py studies/phantoms-student-act unet-s4-prelu unet-s4
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from medkd.evaluation.stats import case_mean_dice, mean_over_runs, mean_sd, paired_comparison

Group = tuple[str, str, str]  # (labels, budget, method)


def read_runs(study: Path) -> list[dict[str, str]]:
    """The study's ``runs.csv``: one row per evaluated run (identity columns, ``test_dice``)."""
    path = study / "runs.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `medkd experiment` for the study first")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def runs_by_group(runs: list[dict[str, str]], student: str) -> dict[Group, dict[str, dict[str, str]]]:
    """``{(labels, budget, method): {seed: runs.csv row}}`` of one student."""
    groups: dict[Group, dict[str, dict[str, str]]] = defaultdict(dict)
    for row in runs:
        if row["student"] == student:
            groups[(row["labels"], row["budget"], row["method"])][row["seed"]] = row
    return groups


def seed_mean_case_dice(study: Path, runs: list[dict[str, str]]) -> dict[str, float]:
    """Each test case's mean foreground Dice, averaged over ``runs`` (seeds)."""
    return mean_over_runs([case_mean_dice(study / "eval" / row["run"] / "per_case.csv") for row in runs])


def compare(study: Path, student_a: str, student_b: str) -> list[dict]:
    """One row per method both students ran: means ± sd over seeds and the paired test of B against A."""
    runs = read_runs(study)
    runs_a, runs_b = runs_by_group(runs, student_a), runs_by_group(runs, student_b)
    for name, groups in ((student_a, runs_a), (student_b, runs_b)):
        if not groups:
            raise SystemExit(f"no evaluated run of student {name!r} in {study / 'runs.csv'}")
    rows = []
    for group in sorted(set(runs_a) & set(runs_b)):
        seeds = sorted(set(runs_a[group]) & set(runs_b[group]))
        a = [runs_a[group][s] for s in seeds]
        b = [runs_b[group][s] for s in seeds]
        test = paired_comparison(seed_mean_case_dice(study, a), seed_mean_case_dice(study, b))
        rows.append({"labels": group[0], "budget": group[1], "method": group[2], "seeds": len(seeds),
                     "a": mean_sd([float(r["test_dice"]) for r in a]),
                     "b": mean_sd([float(r["test_dice"]) for r in b]), **test})
    return rows


def print_table(rows: list[dict], student_a: str, student_b: str) -> None:
    print(f"| labels | budget | method | seeds | {student_a} | {student_b} | delta (B - A) | B wins | Wilcoxon p |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['labels']} | {r['budget']} | {r['method']} | {r['seeds']} | {r['a'][0]:.3f} ± {r['a'][1]:.3f} | "
              f"{r['b'][0]:.3f} ± {r['b'][1]:.3f} | {r['delta']:+.4f} | {r['wins']}/{r['n']} | {r['p_value']:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study's output folder (holds runs.csv and eval/)")
    parser.add_argument("student_a", help="student name in the study file (the reference)")
    parser.add_argument("student_b", help="student name in the study file (compared with A)")
    args = parser.parse_args()
    print_table(compare(args.study, args.student_a, args.student_b), args.student_a, args.student_b)


if __name__ == "__main__":
    main()
