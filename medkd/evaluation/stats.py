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

A study compares several recipes with the same baseline, so its p-values are a family:
:func:`holm` adjusts them (Holm's step-down method, which controls the family-wise error rate
without assuming independence; scipy has no Holm, and it is three lines). :func:`bootstrap_ci` gives
a seeded percentile bootstrap confidence interval of a mean (:func:`scipy.stats.bootstrap`), so a
rerun reproduces the same interval.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap, wilcoxon


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


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given; NaN stays NaN and does not count in the family.

    With the ``m`` finite p-values sorted ascending, ``p_(i)`` (``i = 1..m``) becomes
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``: reject where the adjusted value is below alpha.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return [float(v) for v in adjusted]


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 9999,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (NaN dropped); ``(nan, nan)`` under 2 values.

    Seeded (``numpy.random.default_rng(seed)``), so the same values give the same interval. The
    percentile method, not BCa: BCa is undefined when every resample has the same mean (e.g. all
    paired differences zero), which happens with tiny studies.
    """
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size < 2:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                       method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``, NaN for one value) of the finite ``values``."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    return float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else math.nan
