"""Statistics of studies against hand-computed cases: Holm, bootstrap CIs, gap closed, the summary table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from medkd.evaluation.stats import bootstrap_ci, gap_closed, holm, mean_sd, paired_comparison
from medkd.workflows.study_summary import summary_rows


def test_holm_by_hand():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06; NaN not counted
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02],
                                                                      nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = [0.61, 0.72, 0.55, 0.80, 0.67, 0.70, 0.58, 0.75]
    low, high = bootstrap_ci(values, seed=3)
    assert (low, high) == bootstrap_ci(values, seed=3)  # reproducible
    assert bootstrap_ci(values, seed=4) != (low, high)
    assert low < np.mean(values) < high
    assert min(values) <= low and high <= max(values)
    assert bootstrap_ci([0.2, 0.2, 0.2]) == (0.2, 0.2)  # no spread: the value itself
    assert all(math.isnan(v) for v in bootstrap_ci([0.4]))


def test_gap_closed_and_mean_sd_by_hand():
    assert gap_closed(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.6, 0.8) == pytest.approx(-0.5)
    assert math.isnan(gap_closed(0.7, 0.6, 0.55))  # teacher not better: no gap
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd
    assert math.isnan(mean_sd([1.0])[1])


def _run(run_id, method, seed, dice, role="student"):
    return {"run": run_id, "role": role, "student": "s" if role == "student" else "teacher", "method": method,
            "seed": seed, "budget": "steps10", "view": "equal steps", "labels": "all", "params": 10, "macs": 100,
            "steps": 10, "train_s": 2.0 if method != "kd-b" else 4.0, "step_s": 0.2 if method != "kd-b" else 0.4,
            "latency_ms": 1.0, "val_dice": 0.5, "test_dice": float(np.mean(list(dice.values()))), "test_hd95": 3.0}


def test_summary_rows_by_hand():
    """Two seeds of labels-only and two recipes over four cases; every number checked by hand."""
    base = {0: {"c1": 0.50, "c2": 0.60, "c3": 0.70, "c4": 0.40}, 1: {"c1": 0.52, "c2": 0.58, "c3": 0.70, "c4": 0.44}}
    plus = {s: {c: v + d for (c, v), d in zip(base[s].items(), (0.10, 0.02, 0.04, 0.08))} for s in base}
    minus = {s: {c: v - 0.01 for c, v in base[s].items()} for s in base}
    teacher = {"c1": 0.8, "c2": 0.8, "c3": 0.8, "c4": 0.8}
    per_case = {"T": teacher, **{f"L{s}": base[s] for s in base}, **{f"A{s}": plus[s] for s in base},
                **{f"B{s}": minus[s] for s in base}}
    rows = [_run("T", "teacher", 0, teacher, role="teacher")]
    rows += [_run(f"{p}{s}", m, s, per_case[f"{p}{s}"]) for s in base for p, m in
             (("L", "labels-only"), ("A", "kd-a"), ("B", "kd-b"))]
    out = {r["method"]: r for r in summary_rows(rows, per_case, results=[])}
    base_mean = np.mean([np.mean(list(base[s].values())) for s in base])  # 0.555
    assert out["labels-only"]["test_dice"] == pytest.approx(base_mean)
    a = out["kd-a"]
    assert a["delta"] == pytest.approx(0.06) and a["wins"] == 4 and a["n_cases"] == 4
    assert a["gap_closed"] == pytest.approx(0.06 / (0.8 - base_mean))
    assert a["delta_ci_low"] <= 0.06 <= a["delta_ci_high"]
    b = out["kd-b"]
    assert b["delta"] == pytest.approx(-0.01) and b["wins"] == 0
    assert b["step_time_rel"] == pytest.approx(2.0)
    p_a = wilcoxon([0.10, 0.02, 0.04, 0.08]).pvalue  # per-case differences of the seed means
    p_b = wilcoxon([-0.01] * 4).pvalue
    assert a["p_value"] == pytest.approx(p_a) and b["p_value"] == pytest.approx(p_b)
    assert a["p_holm"] == pytest.approx(min(1, 2 * min(p_a, p_b)))  # both 0.125: Holm doubles the smallest
    assert b["p_holm"] == pytest.approx(max(a["p_holm"], min(1, 1 * max(p_a, p_b))))
    assert "p_value" not in out["labels-only"] and out["teacher"]["seeds"] == 1
    stats = paired_comparison(base[0], plus[0], teacher=0.8)  # the single-seed comparison, for contrast
    assert stats["delta"] == pytest.approx(0.06)
