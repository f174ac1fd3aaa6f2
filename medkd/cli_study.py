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


def report_command(
    study_dir: Annotated[Path, typer.Argument(help="folder of a finished `medkd experiment` (or of --save-results)")],
    save_results: Annotated[Optional[Path], typer.Option(
        help="also copy what a README table is made from (summary/runs.csv, study.yaml, report.md, figures "
             "<= 200 kB, provenance.json) into this folder, e.g. benchmarks/results/<study>")] = None,
    readme: Annotated[Optional[Path], typer.Option(
        help="only replace block --block of this Markdown file with the summary table and its provenance")] = None,
    block: Annotated[Optional[str], typer.Option(
        help="block name: the lines between <!-- medkd-report NAME --> and <!-- /medkd-report NAME -->")] = None,
) -> None:
    """report.html (self-contained) and report.md of a study: summary table, box plots, Dice vs latency, curves.

    With --readme and --block, nothing but that Markdown block is written (STUDY_DIR may then be a
    --save-results folder): `medkd report benchmarks/results/NAME --readme README.md --block NAME`.
    """
    from medkd.workflows.study_readme import save_results as save, update_block

    if (readme is None) != (block is None):
        raise typer.BadParameter("give --readme and --block together")
    if readme is not None and save_results is not None:
        raise typer.BadParameter("--save-results comes with writing the report; run it without --readme first")
    if readme is not None:
        console.print(f"updated block {block} of {update_block(readme, block, study_dir)}")
        return
    from medkd.workflows.study_report import write_report

    console.print(f"written: {', '.join(str(p) for p in write_report(study_dir))}")
    if save_results is not None:
        console.print(f"saved: {', '.join(str(p) for p in save(study_dir, save_results))}")
