"""``medkd experiment`` and ``medkd report``: compare methods over seeds (registered in :mod:`medkd.cli`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
if not console.is_terminal:  # logs and pipes: do not squeeze tables into 80 columns
    console.width = 160


def experiment_command(
    study: Annotated[Path, typer.Argument(help="study file (YAML), see medkd/workflows/study.py")],
    out: Annotated[Optional[Path], typer.Option(help="study folder (default: beside STUDY, named after it)")] = None,
    dry_run: Annotated[bool, typer.Option(help="list the runs, what is left and an estimate of the cost")] = False,
    devices: Annotated[Optional[str], typer.Option(
        help="spread the runs over these slots, one run per slot at a time, each in its own process: "
             "cuda:0,cuda:1 (one GPU each) or cpu:0-1,cpu:2-3 (pinned cores, train.num_threads = cores); "
             "default: one run after another in this process")] = None,
) -> None:
    """Every student x recipe (+ labels-only) x seed x budget of a study; results/runs/summary.csv. Restartable.

    With --devices, distilled students wait for their teacher; OUT/schedule.csv says which slot (and
    process) ran which run and OUT/logs/<run>.log holds each run's output. Ctrl-C or SIGTERM stops every
    slot with a last.pt; run the command again (any --devices) to continue.
    """
    from medkd.workflows.experiment import run_study

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_study(study, out, dry_run=dry_run, devices=devices, console=console)


def report_command(study_dir: Annotated[Path, typer.Argument(help="folder of a finished `medkd experiment`")]) -> None:
    """report.html (self-contained) and report.md of a study: summary table, box plots, Dice vs latency, curves."""
    from medkd.workflows.study_report import write_report

    console.print(f"written: {', '.join(str(p) for p in write_report(study_dir))}")
