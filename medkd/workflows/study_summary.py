"""``summary.csv`` of a study: one row per teacher and per student x method x budget x labelled setting.

Every student row (over its seeds):

* ``seeds``; ``steps``, ``train_s``, ``step_s``, ``latency_ms`` (means), ``params``, ``macs``;
  ``step_time_rel`` = its ``step_s`` / the labels-only student's (same student, budget, labels);
* ``test_dice`` and ``test_dice_sd``: mean and sample sd over seeds of each run's mean test Dice;
  ``dice_<class>``: per-class Dice, mean over cases then seeds; ``test_hd95`` / ``test_hd95_sd`` alike;
* ``test_dice_ci_low`` / ``_high``: seeded percentile bootstrap 95% CI of the mean over test cases of
  each case's Dice averaged over seeds (:func:`medkd.evaluation.stats.bootstrap_ci`);
* against the labels-only student of the same student, budget and labels, on the seeds both have
  (per-case Dice averaged over those seeds, as :func:`medkd.evaluation.stats.paired_comparison`):
  ``n_cases``, ``delta`` (mean paired difference), ``delta_ci_low`` / ``_high`` (bootstrap 95% CI of
  it), ``wins`` (cases where the method is better), ``p_value`` (two-sided Wilcoxon signed-rank),
  ``p_holm`` (Holm-adjusted over the recipes compared with that one labels-only row: one family per
  student x budget x labels), ``gap_closed`` ((method - labels-only) / (teacher - labels-only) on mean
  test Dice, NaN when the teacher is not better).

``view`` says how runs were made equal: ``equal steps`` (a step budget: compare quality per step;
``train_s`` shows what each method costs), ``equal time`` (a wall-clock budget: ``steps`` shows how
far each got), ``steps or time`` (both limits). Teacher rows give the teacher's own numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from medkd.evaluation.stats import bootstrap_ci, holm, mean_over_runs, mean_sd, paired_comparison
from medkd.workflows.study import LABELS_ONLY

GROUP = ("labels", "budget", "student", "method")
COLUMNS = ("view", "budget", "labels", "role", "student", "method", "seeds", "steps", "train_s", "step_s",
           "step_time_rel", "params", "macs", "latency_ms", "val_dice", "test_dice", "test_dice_sd",
           "test_dice_ci_low", "test_dice_ci_high", "test_hd95", "test_hd95_sd", "teacher_dice", "n_cases", "delta",
           "delta_ci_low", "delta_ci_high", "wins", "p_value", "p_holm", "gap_closed")


def summary_columns(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS with the ``dice_<class>`` columns after ``test_dice_ci_high``."""
    classes = list(dict.fromkeys(k for row in rows for k in row if k.startswith("dice_")))
    at = COLUMNS.index("test_hd95")
    return [*COLUMNS[:at], *classes, *COLUMNS[at:]]


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return float(np.mean(values)) if values else math.nan


def _class_dice(results: list[dict[str, Any]], run_ids: set[str]) -> dict[str, float]:
    """``dice_<class>``: per class, the mean over cases per run, then over runs (NaN skipped)."""
    by_class: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in results:
        if row["run"] in run_ids:
            by_class[row["class"]][row["run"]].append(row["dice"])
    return {f"dice_{cls}": float(np.nanmean([np.nanmean(v) for v in runs.values()]))
            for cls, runs in by_class.items()}


def _group_row(rows: list[dict[str, Any]], per_case: Mapping[str, Mapping[str, float]],
               results: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers of one group of runs (the seeds of one method), before the comparison with labels-only."""
    first = rows[0]
    dice_mean, dice_sd = mean_sd([r["test_dice"] for r in rows])
    hd95_mean, hd95_sd = mean_sd([r["test_hd95"] for r in rows])
    cases = mean_over_runs([per_case[r["run"]] for r in rows])
    low, high = bootstrap_ci(list(cases.values()))
    out = {key: first[key] for key in ("view", "budget", "labels", "role", "student", "method")}
    out.update(seeds=len(rows), steps=_mean(rows, "steps"), train_s=_mean(rows, "train_s"),
               step_s=_mean(rows, "step_s"), params=first["params"], macs=first["macs"],
               latency_ms=_mean(rows, "latency_ms"), val_dice=_mean(rows, "val_dice"), test_dice=dice_mean,
               test_dice_sd=dice_sd, test_dice_ci_low=low, test_dice_ci_high=high)
    out.update(_class_dice(results, {r["run"] for r in rows}))
    out.update(test_hd95=hd95_mean, test_hd95_sd=hd95_sd)
    return out


def _compare(row: dict[str, Any], runs: list[dict[str, Any]], base_runs: list[dict[str, Any]],
             per_case: Mapping[str, Mapping[str, float]], teacher_dice: float) -> None:
    """Add the paired comparison with labels-only (seeds both have) to ``row``."""
    row["step_time_rel"] = row["step_s"] / _mean(base_runs, "step_s") if base_runs else math.nan
    seeds = {r["seed"] for r in runs} & {r["seed"] for r in base_runs}
    if row["method"] == LABELS_ONLY or not seeds:
        return
    ours = mean_over_runs([per_case[r["run"]] for r in runs if r["seed"] in seeds])
    base = mean_over_runs([per_case[r["run"]] for r in base_runs if r["seed"] in seeds])
    stats = paired_comparison(base, ours, teacher=teacher_dice)
    common = sorted(set(ours) & set(base))
    low, high = bootstrap_ci([ours[c] - base[c] for c in common])
    row.update(n_cases=stats["n"], delta=stats["delta"], delta_ci_low=low, delta_ci_high=high,
               wins=stats["wins"], p_value=stats["p_value"], gap_closed=stats["gap_closed"])


def summary_rows(run_rows: list[dict[str, Any]], per_case: Mapping[str, Mapping[str, float]],
                 results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary table (see the module doc) from runs.csv rows, per-case Dice per run and results.csv rows."""
    teachers = {r["labels"]: r for r in run_rows if r["role"] == "teacher"}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in run_rows:
        if row["role"] == "student":
            groups[tuple(row[k] for k in GROUP)].append(row)
    out = [{**_group_row([t], per_case, results), "seeds": 1} for t in teachers.values()]
    families: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for key, runs in groups.items():
        labels, budget, student, _method = key
        teacher = teachers.get(labels) or teachers.get("given")
        row = _group_row(runs, per_case, results)
        row["teacher_dice"] = teacher["test_dice"] if teacher else math.nan
        _compare(row, runs, groups.get((labels, budget, student, LABELS_ONLY), []), per_case, row["teacher_dice"])
        families[(labels, budget, student)].append(row)
        out.append(row)
    for family in families.values():
        compared = [r for r in family if "p_value" in r]
        for row, adjusted in zip(compared, holm([r["p_value"] for r in compared])):
            row["p_holm"] = adjusted
    return out
