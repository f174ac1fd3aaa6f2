"""Spreading a study's runs over slots (``medkd experiment --devices``): one process per run, one run per slot.

The runs not yet evaluated are handed out in the study's order: whenever a slot is free, it gets the
first pending run whose teacher is finished (a study's distilled students wait for the teacher of their
labelled setting to be trained and evaluated; labels-only students need no teacher). Each run goes to a
fresh process (``multiprocessing`` spawn, :func:`medkd.workflows.study_slots.run_in_slot`) that trains
or resumes it in its slot and evaluates it, writing its output to ``OUT/logs/<run>.log``. A run's
outcome depends only on its config and seed, so the tables equal those of the serial order.

``OUT/schedule.csv`` records every hand-out (rows of earlier calls kept): ``run``, ``slot_no`` (the
slot's place in ``--devices``, from 1), ``slot`` (as written there), ``pid`` (the run's process), ``status``
(what was left of it: train, resume, evaluate), ``started``, ``ended`` (UTC, ISO 8601) and ``outcome``
(``running``, ``done``, ``stopped``, ``failed``).

Stopping: SIGINT (Ctrl-C) or SIGTERM to the scheduler sends SIGTERM to every slot's process; a
training run writes its ``last.pt`` and stops, an evaluation stops (and is redone next time). The
scheduler then raises :class:`StudyInterrupted` (exit code 130 / 143). A failed run stops the others
the same way and raises :class:`SlotRunFailed` naming the run and its log.
"""

from __future__ import annotations

import multiprocessing
import signal
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from rich.console import Console

from medkd.engine.preemption import StopSignals, TrainingInterrupted
from medkd.evaluation.report import write_csv
from medkd.workflows.experiment import PlannedRun, run_status
from medkd.workflows.study import LABELS_ONLY, Study
from medkd.workflows.study_slots import INTERRUPTED_EXIT, Slot, run_in_slot

SCHEDULE_COLUMNS = ("run", "slot_no", "slot", "pid", "status", "started", "ended", "outcome")


class StudyInterrupted(TrainingInterrupted):
    """The study stopped on a signal; every run it had started kept its last.pt (exit code 128 + signal)."""

    def __init__(self, signum: int, study_path: Path, stopped: list[str]):
        BaseException.__init__(self, f"study stopped by {signal.Signals(signum).name}"
                               + (f"; {', '.join(stopped)} stopped and resume(s) from last.pt" if stopped else "")
                               + f": run `medkd experiment {study_path}` (same --out, any --devices) again to continue")
        self.signum, self.step, self.checkpoint = signum, None, None


class SlotRunFailed(ValueError):
    """A run failed in its slot's process; the message names the run, the slot and the log with the traceback."""


def dependencies(runs: list[PlannedRun]) -> dict[str, set[str]]:
    """``{run: runs it must wait for}``: a distilled student waits for its labelled setting's trained teacher."""
    teachers = {r.labels: r.run_id for r in runs if r.role == "teacher" and r.trained_here}
    return {r.run_id: {teachers[r.labels]} if r.role == "student" and r.method != LABELS_ONLY
            and r.labels in teachers else set() for r in runs}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _StopRequest(StopSignals):
    """Within ``with``: SIGINT/SIGTERM only record :attr:`signum`, however often they come (a second signal
    does not raise as in :class:`StopSignals`: the scheduler stops every slot in order either way)."""

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum


class _Scheduler:
    """Hands out runs to slots and keeps ``schedule.csv``; see the module doc."""

    def __init__(self, runs: list[PlannedRun], study: Study, slots: list[Slot], out: Path, console: Console):
        self.runs, self.study, self.slots, self.out, self.console = runs, study, slots, out, console
        self.pending = [r for r in runs if run_status(r) != "done"]
        self.needs = dependencies(runs)
        self.running: dict[int, tuple[PlannedRun, Any, dict[str, Any]]] = {}  # slot index -> run, process, row
        self.schedule_path = out / "schedule.csv"
        self.rows = _read_rows(self.schedule_path)
        self.failed: str | None = None
        self.stopped: list[str] = []
        self.signalled: set[int] = set()  # pids sent SIGTERM
        self.context = multiprocessing.get_context("spawn")

    def _next_run(self) -> PlannedRun | None:
        unfinished = {r.run_id for r in self.pending} | {r.run_id for r, _, _ in self.running.values()}
        return next((r for r in self.pending if not self.needs[r.run_id] & unfinished), None)

    def start_free_slots(self) -> None:
        for index, slot in enumerate(self.slots):
            run = None if index in self.running else self._next_run()
            if run is None:
                continue
            self.pending.remove(run)
            status = run_status(run)
            log_path = self.out / "logs" / f"{run.run_id}.log"
            process = self.context.Process(target=run_in_slot, args=(run, self.study, slot, str(log_path)),
                                           name=f"medkd-{slot.name}")
            process.start()
            row = {"run": run.run_id, "slot_no": index + 1, "slot": slot.name, "pid": process.pid, "status": status,
                   "started": _now(), "ended": "", "outcome": "running"}
            self.rows.append(row)
            self.running[index] = (run, process, row)
            self.console.print(f"[bold][{self.runs.index(run) + 1}/{len(self.runs)}][/] {run.run_id}: {status} "
                               f"in slot {slot.name} (pid {process.pid}, log {log_path})")
        write_csv(self.rows, self.schedule_path, fieldnames=SCHEDULE_COLUMNS)

    def collect_finished(self, stopping: bool) -> None:
        for index, (run, process, row) in list(self.running.items()):
            if process.exitcode is None:
                continue
            process.join()
            del self.running[index]
            done = (run.eval_dir / "run.json").is_file()  # written last: done, even if a signal came after it
            stopped = not done and (process.exitcode == INTERRUPTED_EXIT or (stopping and process.exitcode < 0))
            row.update(ended=_now(), outcome="done" if done else "stopped" if stopped else "failed")
            if stopped:
                self.stopped.append(run.run_id)
            if stopped and not stopping and self.failed is None:  # a signal sent to the run's process alone
                self.failed = (f"run {run.run_id} in slot {row['slot']} was stopped by a signal to its process "
                               f"{process.pid}; run the command again to resume it")
            elif not done and not stopped and self.failed is None:
                self.failed = (f"run {run.run_id} failed in slot {row['slot']} (exit code {process.exitcode}); "
                               f"its output and traceback: {self.out / 'logs' / (run.run_id + '.log')}")
            self.console.print(f"{run.run_id}: {row['outcome']} in slot {row['slot']}")
        write_csv(self.rows, self.schedule_path, fieldnames=SCHEDULE_COLUMNS)

    def __enter__(self) -> "_Scheduler":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        """On an unexpected error here, stop the slots' processes (they save) rather than leave them behind."""
        if kind is not None:
            self.stop_all()
            for _, process, _ in self.running.values():
                process.join()

    def stop_all(self) -> None:
        """SIGTERM to every running slot process (once each): runs write last.pt and stop."""
        for _, process, _ in self.running.values():
            if process.pid not in self.signalled and process.exitcode is None:
                process.terminate()
                self.signalled.add(process.pid)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: row.get(k, "") for k in SCHEDULE_COLUMNS} for row in csv.DictReader(handle)]


def run_on_slots(runs: list[PlannedRun], study: Study, slots: list[Slot], out: Path, study_path: Path,
                 console: Console) -> None:
    """Train and evaluate every run not yet evaluated, spread over ``slots`` (see the module doc).

    Raises :class:`StudyInterrupted` after a stop signal and :class:`SlotRunFailed` when a run failed,
    in both cases once every slot's process has ended.
    """
    scheduler = _Scheduler(runs, study, slots, out, console)
    with _StopRequest() as stop, scheduler:
        while scheduler.pending or scheduler.running:
            halt = stop.signum is not None or scheduler.failed is not None
            if halt:
                scheduler.stop_all()
                scheduler.pending.clear()
            else:
                scheduler.start_free_slots()
            if not scheduler.running:
                if scheduler.pending:  # cannot happen: a teacher has no dependency
                    raise RuntimeError(f"no pending run can start: {[r.run_id for r in scheduler.pending]}")
                break
            wait([process.sentinel for _, process, _ in scheduler.running.values()], timeout=1.0)
            scheduler.collect_finished(stopping=halt or stop.signum is not None)
    if scheduler.failed is not None:
        raise SlotRunFailed(scheduler.failed)
    if stop.signum is not None:
        raise StudyInterrupted(stop.signum, study_path, scheduler.stopped)
