"""Paired comparison of two models on the same cases: is a distilled student really better?

A claim that distillation helps compares the distilled student with the *same* student trained on
labels alone, case by case on the same test cases (and, over seeds, seed by seed):

* ``delta`` = mean over cases of ``score_b - score_a`` (the per-case differences, not the
  difference of two means computed on different cases);
* ``p_value`` of the two-sided Wilcoxon signed-rank test on those per-case differences
  (:func:`scipy.stats.wilcoxon`; zero differences are dropped, ``zero_method="wilcox"``);
* ``gap_closed`` = ``(b - a) / (teacher - a)`` on the means: the fraction of the teacher-student
  gap the distilled student closes (1 = reaches the teacher, 0 = no better than labels alone,
  negative = worse). Undefined (NaN) when the teacher is not better than the labels-only student.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon


def case_mean_dice(per_case_csv: str | Path) -> dict[str, float]:
    """Mean foreground Dice of each case (over its classes, NaN classes skipped) from ``per_case.csv``."""
    by_case: dict[str, list[float]] = {}
    with open(per_case_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            by_case.setdefault(row["case"], []).append(float(row["dice"]))
    return {case: float(np.nanmean(values)) for case, values in by_case.items() if not np.all(np.isnan(values))}


def mean_over_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-case scores averaged over runs (seeds); only cases scored in every run are kept."""
    if not runs:
        raise ValueError("mean_over_runs needs at least one run")
    common = set(runs[0]).intersection(*runs[1:])
    return {case: float(np.mean([run[case] for run in runs])) for case in sorted(common)}


def gap_closed(student: float, baseline: float, teacher: float) -> float:
    """``(student - baseline) / (teacher - baseline)``; NaN when the teacher does not beat the baseline."""
    gap = teacher - baseline
    return (student - baseline) / gap if gap > 0 else math.nan


def paired_comparison(baseline: Mapping[str, float], other: Mapping[str, float],
                      teacher: float | None = None) -> dict[str, float | int]:
    """Compare ``other`` with ``baseline`` on the cases both scored.

    Args:
        baseline: per-case score of the reference model (e.g. the labels-only student).
        other: per-case score of the candidate (e.g. the distilled student).
        teacher: the teacher's mean score, for ``gap_closed`` (optional).

    Returns:
        ``{"n": cases, "baseline": mean, "other": mean, "delta": mean paired difference,
        "wins": cases where other > baseline, "p_value": Wilcoxon two-sided, "gap_closed": ...}``.
    """
    cases = sorted(set(baseline) & set(other))
    if not cases:
        raise ValueError("the two models share no scored case")
    a = np.array([baseline[c] for c in cases])
    b = np.array([other[c] for c in cases])
    diff = b - a
    p_value = math.nan if np.allclose(diff, 0) or len(cases) < 2 else float(wilcoxon(b, a).pvalue)
    out: dict[str, float | int] = {"n": len(cases), "baseline": float(a.mean()), "other": float(b.mean()),
                                   "delta": float(diff.mean()), "wins": int((diff > 0).sum()), "p_value": p_value}
    if teacher is not None:
        out["gap_closed"] = gap_closed(out["other"], out["baseline"], teacher)
    return out
