"""``medkd experiment --dry-run``: the runs of a study, what is left of each, and an estimate of its cost.

Cost of a run = steps left x time per step, capped by its wall-clock budget (``minutes`` budgets
cost their minutes). Time per step is *measured* where the study already has runs of the same
student and method (``result.json``: elapsed / steps, else the last row of ``train_log.csv``), else
taken from the same student's labels-only runs (plus a teacher forward for live-teacher recipes), and
otherwise *estimated* from a few forward/backward passes of the network on a random batch of the
run's batch and patch size, plus a teacher forward for recipes that run the teacher live. The
estimate leaves out data loading, validation, teacher-output caching and the evaluation of the test
cases, so real runs take longer; the measured times include everything but the evaluation.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medkd.config import RunConfig, build_config
from medkd.evaluation.report import comparison_table
from medkd.workflows.experiment import PlannedRun, run_status
from medkd.workflows.study import LABELS_ONLY, Study


def _measured_s_per_step(run_dir: Path) -> tuple[float, int] | None:
    """``(seconds per step, steps done)`` of a finished or partial run, from result.json or train_log.csv."""
    result = run_dir / "result.json"
    if result.is_file():
        data = json.loads(result.read_text())
        return (data["elapsed_s"] / data["steps"], data["steps"]) if data["steps"] else None
    log = run_dir / "train_log.csv"
    if log.is_file():
        with open(log, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and float(rows[-1]["step"]) > 0:
            return float(rows[-1]["elapsed_s"]) / float(rows[-1]["step"]), int(float(rows[-1]["step"]))
    return None


def _bench(network: Any, cfg: RunConfig, channels: int, classes: int, backward: bool, repeats: int = 3) -> float:
    """Seconds of one step (forward, and with ``backward`` loss, backward and AdamW) on a random batch,
    with the run's ``train.num_threads`` (the trainer sets it too; a 1-thread run steps slower than all cores)."""
    import torch
    import torch.nn.functional as F

    from medkd.models.complexity import torch_threads

    x = torch.randn(cfg.data.batch_size, channels, *cfg.data.patch_size)
    y = torch.randint(0, classes, (cfg.data.batch_size, *cfg.data.patch_size))
    optimizer = torch.optim.AdamW(network.parameters()) if backward else None
    times = []
    with torch_threads(cfg.train.num_threads):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.set_grad_enabled(backward):
                logits = network(x)
                logits = logits[0] if isinstance(logits, (list, tuple)) else logits
                if backward:
                    optimizer.zero_grad()
                    F.cross_entropy(logits, y).backward()
                    optimizer.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _network(model: Any, dims: int, channels: int, classes: int) -> Any:
    from medkd.models import create

    return create(model.name, dims, channels, classes, preset=model.preset, shrink=model.shrink,
                  deep_supervision=model.deep_supervision, **model.kwargs)


class StepTimes:
    """Seconds per step of each planned run: measured on the study's runs, else estimated (see the module doc)."""

    def __init__(self, study: Study, runs: list[PlannedRun]):
        from medkd.data.dataset import load_dataset

        dataset = load_dataset(study.dataset)
        self.study, self.channels, self.classes = study, dataset.num_channels, dataset.num_classes
        self.measured: dict[tuple[str, str], list[float]] = {}
        for run in runs:
            found = _measured_s_per_step(run.run_dir) if run.run_dir else None
            if found:
                self.measured.setdefault((run.student, run.method), []).append(found[0])
        self.benched: dict[str, float] = {}

    def _bench_model(self, cfg: RunConfig, model: Any, backward: bool) -> float:
        key = json.dumps([model.model_dump(mode="json"), cfg.data.batch_size, cfg.data.patch_size, backward])
        if key not in self.benched:
            network = _network(model, cfg.data.spatial_dims, self.channels, self.classes)
            self.benched[key] = _bench(network, cfg, self.channels, self.classes, backward)
        return self.benched[key]

    def _live_teacher_s(self, cfg: RunConfig) -> float:
        """Forward time of the teacher for recipes that run it live (0 for cached teacher outputs)."""
        from medkd.recipes import recipe_from_dict

        if cfg.distill is None or recipe_from_dict(cfg.distill.recipe).uses_cache:
            return 0.0
        if self.study.teacher.model is not None:
            return self._bench_model(cfg, self.study.teacher.model, backward=False)
        from medkd.engine.ensemble import load_predictor

        predictor = load_predictor(cfg.distill.teacher)
        return sum(_bench(m.model, cfg, self.channels, self.classes, backward=False)
                   for m in getattr(predictor, "members", [predictor]))

    def of(self, run: PlannedRun) -> tuple[float, str]:
        """``(seconds per step, "measured" | "estimated")`` for ``run``."""
        if (run.student, run.method) in self.measured:
            return statistics.median(self.measured[(run.student, run.method)]), "measured"
        cfg = build_config(run.tree)
        if (run.student, LABELS_ONLY) in self.measured:  # the same student's measured step, plus a live teacher
            base = statistics.median(self.measured[(run.student, LABELS_ONLY)])
            return base + self._live_teacher_s(cfg), "measured (labels-only)"
        return self._bench_model(cfg, cfg.model, backward=True) + self._live_teacher_s(cfg), "estimated"


def _steps_done(run: PlannedRun) -> tuple[int, float]:
    """Steps and seconds a partial run has done (from its log; 0 for a new run)."""
    found = _measured_s_per_step(run.run_dir) if run.run_dir else None
    return (found[1], found[0] * found[1]) if found else (0, 0.0)


def plan_rows(study: Study, runs: list[PlannedRun]) -> list[dict[str, Any]]:
    """One row per run: status, budget, seconds per step (and whether measured) and minutes left."""
    times = StepTimes(study, runs)
    rows = []
    for run in runs:
        status = run_status(run)
        row = {"run": run.run_id, "status": status, "budget": run.budget.tag if run.budget else "given",
               "s_per_step": None, "source": "", "minutes": 0.0}
        if status in ("train", "resume"):
            s_per_step, source = times.of(run)
            done, elapsed = _steps_done(run) if status == "resume" else (0, 0.0)
            left = [(run.budget.steps - done) * s_per_step] if run.budget.steps else []
            left += [run.budget.minutes * 60 - elapsed] if run.budget.minutes else []
            row.update(s_per_step=s_per_step, source=source, minutes=max(0.0, min(left)) / 60)
        rows.append(row)
    return rows


def print_plan(study: Study, runs: list[PlannedRun], console: Console, slots: int = 1) -> list[dict[str, Any]]:
    """Print the dry-run table and the total (spread over ``slots`` slots: about the total / slots); return its rows."""
    rows = plan_rows(study, runs)
    columns = [("run", "run", "s"), ("status", "status", "s"), ("budget", "budget", "s"),
               ("s_per_step", "s/step", ".3f"), ("source", "step time", "s"), ("minutes", "est. min", ".1f")]
    console.print(comparison_table(rows, columns, title=f"study {study.name}: {len(runs)} runs"))
    todo = [r for r in rows if r["status"] in ("train", "resume")]
    evaluate = sum(r["status"] != "done" for r in rows)
    total = sum(r["minutes"] for r in todo)
    spread = "one run after another" if slots == 1 else f"about {total / slots:.1f} min spread over {slots} slots"
    console.print(f"{len(todo)} run(s) to train or resume, {evaluate} to evaluate; about {total:.1f} min of "
                  f"training, {spread} (not counting data loading, validation, teacher-output caching and "
                  "evaluation of the test cases)")
    return rows
