"""The teacher a new user gets: ``medkd train --dataset ACDC --max-time-min M`` with nothing else.

Runs the ``medkd`` command itself (so it plans from the data as a user's run does, and its budget
counts start-up, planning and preprocessing), ``--mode 2d`` and/or ``3d``, then scores the run's
``best.pt`` on the 40 held-out test volumes (post-processing as decided on its validation cases).
Prints the plan the run used (patch, batch, teacher width and parameters), the steps it reached and
the test Dice. ``--tag`` names the rows so that two versions of medkd (e.g. before and after a planner
change) can be compared in one output folder; ``--set KEY=VALUE`` is passed on (e.g. a fixed patch).

    taskset -c 0 python benchmarks/default_teacher.py --minutes 12 --threads 1 --modes 2d --tag planner-v2

Finished runs are reused. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console

from medkd.engine.inference import Predictor
from medkd.evaluation.report import comparison_table, write_csv

from acdc_2d_supervised import DEFAULT_DATA, newest_input, test_scores


def train_default(data: Path, run_dir: Path, mode: str, minutes: float, threads: int, sets: list[str],
                  plan: Path | None = None) -> dict:
    """``medkd train`` with the dataset, mode, budget and thread count only (plus ``--set`` extras, and a
    ``--plan`` made by ``medkd plan`` with other budget options, e.g. ``--gmacs``)."""
    if not (run_dir / "result.json").is_file():
        command = [str(Path(sys.executable).parent / "medkd"), "train", "--dataset", str(data), "--mode", mode,
                   "--max-time-min", str(minutes), "--run-dir", str(run_dir), "--set", f"train.num_threads={threads}"]
        for item in sets:
            command += ["--set", item]
        if plan is not None:
            command += ["--plan", str(plan), "--configuration", "2d" if mode == "2d" else "3d_fullres"]
        subprocess.run(command, check=True)
    return json.loads((run_dir / "result.json").read_text())


def plan_summary(run_dir: Path) -> dict:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"patch": "x".join(map(str, config["data"]["patch_size"])), "batch": config["data"]["batch_size"],
            "shrink": config["model"].get("shrink", 0), "configuration": (config.get("plan") or {}).get("configuration")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=["2d", "3d"], default=["2d"])
    parser.add_argument("--tag", default="default", help="row label and run-folder prefix")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE passed to medkd train")
    parser.add_argument("--plan", type=Path, default=None, help="plans.json from `medkd plan` (default: planned by "
                        "the run itself, as a user's run is)")
    parser.add_argument("--out", type=Path, default=Path("bench_runs/default_teacher"))
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        run_dir = args.out / f"{args.tag}_{mode}"
        result = train_default(args.data, run_dir, mode, args.minutes, args.threads, args.sets, args.plan)
        checkpoint = run_dir / "best.pt"
        scores = test_scores(f"{args.tag}_{mode}", Predictor(checkpoint), args.data, args.out,
                             reuse_after=newest_input(checkpoint))
        rows.append({"run": f"{args.tag} {mode}", **plan_summary(run_dir),
                     "params": sum(p.numel() for p in Predictor(checkpoint).model.parameters()),
                     "steps": result["steps"], "total_s": result.get("phases_s", {}).get("total"),
                     "val_dice": result["best_metric"], "dice": scores["mean_dice"], "hd95": scores["hd95"]})
    write_csv(rows, args.out / f"{args.tag}_summary.csv")
    columns = [("run", "run", "s"), ("configuration", "plan", "s"), ("patch", "patch", "s"), ("batch", "batch", "d"),
               ("shrink", "teacher shrink", "d"), ("params", "params", ",d"), ("steps", "steps", ",d"),
               ("total_s", "command s", ".0f"), ("val_dice", "val Dice", ".3f"), ("dice", "test Dice", ".3f"),
               ("hd95", "HD95", ".2f")]
    Console(width=200).print(comparison_table(rows, columns, title=f"medkd train defaults, {args.minutes:g} min, "
                                                                 f"{args.threads} thread(s)"))


if __name__ == "__main__":
    main()
