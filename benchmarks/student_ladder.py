"""Student ladder on ACDC 2D: how small can a student be before it needs a teacher?

For each student (UNet at width reduction t = 3..6, and the student presets of other registry
architectures) the table gives parameters, GMACs and CPU latency of one 256x224 slice (one thread,
median of 20 forwards) and the test Dice of the student trained on labels alone for ``--steps``
optimiser steps (batch 16, 128x128 patches, no mirroring). Beside a teacher's test Dice, it shows where
labels-only training falls clearly (>= 5 points) below the teacher: where distillation must prove itself.

    python benchmarks/student_ladder.py --teacher bench_runs/teacher/best.pt --steps 2000 --seeds 0

Finished runs are reused (restartable). Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from medkd.engine.inference import Predictor
from medkd.evaluation.report import comparison_table, write_csv
from medkd.models import count_macs, count_parameters, create, measure_latency

from acdc_2d_distill import scored, student_config
from acdc_2d_supervised import DEFAULT_DATA

SLICE = (1, 1, 256, 224)
LADDER = [("unet", 3), ("unet", 4), ("unet", 5), ("unet", 6), ("basicunet", None), ("dynunet", None)]


def size_and_speed(network: torch.nn.Module) -> dict:
    """Parameters, GMACs and one-thread CPU latency (median of 20) of one 256x224 slice."""
    torch.set_num_threads(1)
    network.eval()
    return {"params": count_parameters(network), "gmacs": count_macs(network, SLICE) / 1e9,
            "ms_slice": measure_latency(network, SLICE, repeats=20)["median_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--teacher", type=Path, default=None, help="best.pt of the teacher to compare with")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/student_ladder"))
    args = parser.parse_args()
    rows = []
    teacher_dice = None
    if args.teacher is not None:
        teacher = scored(args.data, args.out, "teacher", args.teacher.parent, None)
        teacher_dice = teacher["mean_dice"]
        rows.append({"student": "teacher", **size_and_speed(Predictor(args.teacher).model), "dice": teacher_dice})
    for name, shrink in LADDER:
        label = f"{name} t={shrink if shrink is not None else 3}"
        dice = []
        for seed in args.seeds:
            tree = student_config(args.data, args.out / "cache", seed, steps=args.steps, minutes=None,
                                  val_every=args.steps // 4, shrink=shrink, model=name)
            tree["train"]["num_threads"] = args.threads
            run = f"{name}_t{shrink}_seed{seed}"
            dice.append(scored(args.data, args.out, run, args.out / run, tree)["mean_dice"])
        network = create(name, 2, 1, 4, preset="student", shrink=shrink)
        row = {"student": label, **size_and_speed(network), "dice": float(np.mean(dice)),
               "dice_std": float(np.std(dice)), "seeds": len(dice)}
        if teacher_dice is not None:
            row["below_teacher"] = teacher_dice - row["dice"]
        rows.append(row)
    write_csv(rows, args.out / "summary.csv")
    columns = [("student", "student", "s"), ("params", "params", ",d"), ("gmacs", "GMAC/slice", ".3f"),
               ("ms_slice", "CPU ms/slice (1 thread)", ".1f"), ("seeds", "seeds", "d"),
               ("dice", "labels-only test Dice", ".3f"), ("dice_std", "± std", ".3f"),
               ("below_teacher", "teacher − student", "+.3f")]
    Console(width=200).print(comparison_table(rows, columns, title=f"ACDC 2D student ladder, {args.steps} steps"))


if __name__ == "__main__":
    main()
