"""Budgets mean wall time: window counts, the reserve for the final phases, phases in result.json."""

from __future__ import annotations

import json
import time

import torch
from monai.data.utils import dense_patch_slices
from typer.testing import CliRunner

from medkd.engine.budget import (
    EXIT_S,
    INFERENCE_BATCH,
    PhaseClock,
    TimeBudget,
    inference_windows,
    seconds_per_window,
    sliding_windows,
)


def test_window_count_matches_monai():
    for shape, patch in [((100, 90), (64, 64)), ((10, 144, 112), (10, 64, 64)), ((40, 40), (64, 64))]:
        padded = [max(s, p) for s, p in zip(shape, patch)]
        scan = [max(1, int(p * 0.5)) for p in patch]
        assert sliding_windows(shape, patch) == len(dense_patch_slices(padded, patch, scan))
    assert inference_windows([(3, 100, 90)], "2d", (64, 64)) == 3 * sliding_windows((100, 90), (64, 64))


def test_window_time_is_measured_on_a_batch_of_windows_as_validation_runs_them():
    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.batches = []

        def forward(self, x):
            self.batches.append(x.shape[0])
            time.sleep(0.02)  # a fixed cost per forward, as a small network's overhead is
            return x

    net = Slow().train()
    per_window = seconds_per_window(net, 1, (16, 16), torch.device("cpu"))
    assert net.batches == [INFERENCE_BATCH] * 3 and net.training  # warm-up + 2 timed, training mode restored
    assert 0.02 / INFERENCE_BATCH <= per_window < 0.02  # the forward's cost shared by its windows


def test_reserve_is_calibrated_by_measured_validations():
    budget = TimeBudget(600.0, val_windows=100, final_windows=300, window_s=0.1)
    assert budget.reserve_s == 300 * 0.1 * 1.25 + EXIT_S and budget.loop_s == 600 - 37.5 - EXIT_S
    budget.validated(20.0)  # twice the estimate (10 s)
    assert budget.reserve_s == 60.0 + EXIT_S
    assert TimeBudget(60.0, 1e9, 1e9, 1.0).loop_s == 0.6  # never below 1% of the budget
    clock = PhaseClock(time.monotonic())
    clock.add("checkpoints", 2.0)
    stepping = TimeBudget(100.0, 0, 0, 0.0, clock, checkpoint_s=9.0)
    assert stepping.fraction(10.0, 0) == 10.0 / (96.0 - EXIT_S)  # two checkpoint writes reserved (as timed)
    assert stepping.fraction(14.0, 2) == 14.0 / (94.0 - EXIT_S)  # and the next step (2 s each)
    assert TimeBudget(100.0, 0, 0, 0.0, None, checkpoint_s=3.0).reserve_s == 6.0 + EXIT_S  # as estimated


def test_a_budget_spent_before_training_says_so_once_with_a_budget_that_fits(caplog):
    budget = TimeBudget(60.0, val_windows=10, final_windows=40, window_s=0.25)  # reserve 12.5 + EXIT_S
    with caplog.at_level("WARNING", logger="medkd.engine.budget"):
        budget.fraction(64.0, 0)  # start-up, planning, preprocessing and the cache fill took 64 s
        budget.fraction(66.0, 1)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "1.0-minute budget was spent before training began" in message and "took 64 s" in message
    assert "ends about 22 s over" in message and "--max-time-min at least 2.0" in message
    caplog.clear()
    TimeBudget(600.0, 10, 40, 0.25).fraction(64.0, 0)  # room left: nothing to say
    assert not caplog.records


def test_clock_reports_phases_and_the_rest():
    clock = PhaseClock(time.monotonic() - 1.0)
    with clock.phase("train"):
        time.sleep(0.01)
    report = clock.report()
    assert report["train"] >= 0.01 and report["total"] >= 1.0
    assert abs(report["train"] + report["other"] - report["total"]) < 0.02
    assert "startup" in PhaseClock().phases


def test_time_budgeted_run_reports_each_phase(phantoms_2d, tmp_path):
    from medkd.cli import app

    torch.set_num_threads(2)
    result = CliRunner().invoke(app, ["train", "--dataset", str(phantoms_2d), "--preset", "student", "--max-time-min",
                                      "0.2", "--run-dir", str(tmp_path / "r"), "--num-workers", "0", "--set",
                                      f"data.cache_dir={tmp_path / 'c'}", "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "result.json").read_text())
    phases = summary["phases_s"]
    assert {"plan", "preprocess", "task_setup", "train", "final_validation", "postprocess", "total"} <= set(phases)
    assert summary["max_time_min"] == 0.2 and summary["steps"] >= 1
    assert summary["elapsed_s"] <= phases["total"]
