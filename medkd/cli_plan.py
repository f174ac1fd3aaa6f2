"""``medkd plan``: fingerprint a dataset and plan its runs (a typer command registered in :mod:`medkd.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
    console.width = 200


def plan_command(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw or MSD dataset folder")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write the plans here (JSON) for "
                                                   "`medkd train --plan`")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --output file")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="where the fingerprint is cached (default: "
                                                      "$MEDKD_CACHE or .cache/medkd)")] = None,
    minutes: Annotated[float, typer.Option(help="budget: training minutes of a teacher")] = 10.0,
    min_steps: Annotated[int, typer.Option(help="budget: teacher steps those minutes must hold")] = 4000,
    threads: Annotated[int, typer.Option(help="budget: CPU threads of a run")] = 2,
    gmacs: Annotated[float, typer.Option(help="budget: training GMAC/s of one thread (forward + backward = 3x "
                                         "forward MACs); 8: whole training steps measured on a 2-core VM")] = 8.0,
    measure: Annotated[bool, typer.Option("--measure", help="measure --gmacs on this machine now (a few seconds; "
                                          "under load it is lower, and so are the planned patches)")] = False,
    memory_gb: Annotated[float, typer.Option(help="budget: memory of a training step (activations, weights, "
                                             "AdamW state)")] = 4.0,
    latency_ms: Annotated[Optional[float], typer.Option(help="also time the student ladder (unet widths / 2^t, "
                                                        "t = 0..6; ONNX) on this machine and name, per configuration, "
                                                        "the widest student predicting a median case within this")] = None,
    latency_threads: Annotated[int, typer.Option(help="threads of the latency measurement")] = 1,
) -> None:
    """Fingerprint DATASET (spacings, shapes, foreground intensities, class frequencies; cached) and plan each
    configuration (2d, 3d_fullres, 3d_lowres for very large images) with nnU-Net's rules for a CPU budget:
    target spacing, patch and batch, normalisation, stages and pooling per axis, teacher and student.
    With --latency-ms, also the widest student that predicts a median case within that time here."""
    from medkd.plans import Budget
    from medkd.workflows.plan import fingerprint_bar, fingerprint_lines, make_plans, plans_table, write_plans

    if latency_ms is not None and not latency_ms > 0:
        raise ValueError(f"--latency-ms must be > 0, got {latency_ms:g}")
    if measure:
        from medkd.plans.cost import measure_gmacs_per_thread

        gmacs = measure_gmacs_per_thread(threads)
        console.print(f"measured: {gmacs:.1f} GMAC/s per thread with {threads} thread(s)")
    budget = Budget(minutes=minutes, min_steps=min_steps, threads=threads, gmacs_per_thread=gmacs,
                    memory_gb=memory_gb)
    if output is not None and output.exists() and not force:
        raise FileExistsError(f"{output} exists; choose another -o or pass --force to replace it")
    plans = make_plans(dataset, cache_dir=cache_dir, budget=budget, progress=fingerprint_bar)
    console.print(plans_table(plans))
    for line in fingerprint_lines(plans):
        console.print(line, markup=False, highlight=False)
    if latency_ms is not None:
        from medkd.workflows.latency_ladder import configuration_ladder, ladder_table, ladder_verdict

        plans["latency_ladders"] = {}
        for name in plans["configurations"]:
            ladder = configuration_ladder(plans, name, latency_ms, threads=latency_threads,
                                          note=lambda line: console.print(line, style="dim"))
            plans["latency_ladders"][name] = ladder
            console.print(ladder_table(ladder))
            console.print(ladder_verdict(ladder), markup=False, highlight=False)
    if output is not None:
        console.print(f"written: {write_plans(plans, output, force=force)}")
