"""Compare two students of one study, recipe by recipe, paired per test case.

A study (``medkd experiment``) compares each recipe with labels-only for the same student; this script
compares two *students* trained the same way, e.g. one network with two activations
(``studies/phantoms-student-act.yaml``). For every method both students ran (labels-only included), at the
same labelled setting and budget, and on the seeds both have, it averages each case's foreground Dice over
the seeds and runs the paired Wilcoxon test of :func:`medkd.evaluation.stats.paired_comparison`
(B against A: delta = B - A). It reads the study's ``results.csv``; nothing is trained.

    python benchmarks/compare_study_runs.py studies/phantoms-student-act unet-s4-prelu unet-s4
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from medkd.evaluation.stats import mean_over_runs, mean_sd, paired_comparison

Group = tuple[str, str, str]  # (labels, budget, method)


def per_run_case_dice(results_csv: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """Per run: each case's mean foreground Dice (NaN classes skipped), and the run's identity columns."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    identity: dict[str, dict[str, str]] = {}
    with open(results_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            scores[row["run"]][row["case"]].append(float(row["dice"]))
            identity[row["run"]] = {key: row[key] for key in ("student", "method", "seed", "budget", "labels")}
    means = {run: {case: float(np.nanmean(values)) for case, values in cases.items()
                   if not np.all(np.isnan(values))} for run, cases in scores.items()}
    return means, identity


def runs_by_group(identity: dict[str, dict[str, str]], student: str) -> dict[Group, dict[str, str]]:
    """``{(labels, budget, method): {seed: run}}`` of one student."""
    groups: dict[Group, dict[str, str]] = defaultdict(dict)
    for run, who in identity.items():
        if who["student"] == student:
            groups[(who["labels"], who["budget"], who["method"])][who["seed"]] = run
    return groups


def compare(study: Path, student_a: str, student_b: str) -> list[dict]:
    """One row per method both students ran: means ± sd over seeds and the paired test of B against A."""
    if not (study / "results.csv").is_file():
        raise SystemExit(f"{study / 'results.csv'} not found: run `medkd experiment` for the study first")
    case_dice, identity = per_run_case_dice(study / "results.csv")
    runs_a, runs_b = runs_by_group(identity, student_a), runs_by_group(identity, student_b)
    for name, runs in ((student_a, runs_a), (student_b, runs_b)):
        if not runs:
            raise SystemExit(f"no evaluated run of student {name!r} in {study / 'results.csv'}")
    rows = []
    for group in sorted(set(runs_a) & set(runs_b)):
        seeds = sorted(set(runs_a[group]) & set(runs_b[group]))
        a = [case_dice[runs_a[group][s]] for s in seeds]
        b = [case_dice[runs_b[group][s]] for s in seeds]
        test = paired_comparison(mean_over_runs(a), mean_over_runs(b))
        rows.append({"labels": group[0], "budget": group[1], "method": group[2], "seeds": len(seeds),
                     "a": mean_sd([float(np.mean(list(r.values()))) for r in a]),
                     "b": mean_sd([float(np.mean(list(r.values()))) for r in b]), **test})
    return rows


def print_table(rows: list[dict], student_a: str, student_b: str) -> None:
    print(f"| labels | budget | method | seeds | {student_a} | {student_b} | delta (B - A) | B wins | Wilcoxon p |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['labels']} | {r['budget']} | {r['method']} | {r['seeds']} | {r['a'][0]:.3f} ± {r['a'][1]:.3f} | "
              f"{r['b'][0]:.3f} ± {r['b'][1]:.3f} | {r['delta']:+.4f} | {r['wins']}/{r['n']} | {r['p_value']:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study's output folder (holds results.csv)")
    parser.add_argument("student_a", help="student name in the study file (the reference)")
    parser.add_argument("student_b", help="student name in the study file (compared with A)")
    args = parser.parse_args()
    print_table(compare(args.study, args.student_a, args.student_b), args.student_a, args.student_b)


if __name__ == "__main__":
    main()
