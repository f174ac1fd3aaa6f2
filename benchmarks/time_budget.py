"""Does ``--max-time-min`` bound the whole command? Wall time of `medkd train` and `medkd distill` against it.

Writes a 3D phantom dataset, then runs, as separate processes (so start-up counts, as for a user):
a teacher ``medkd train`` (planned from the data) and a ``medkd distill --recipe logit-kd`` from it (its
teacher-output cache filled inside the budget), each under ``--max-time-min``; prints per command the
budget, the measured wall time, the overrun and the phases of ``result.json``.

    taskset -c 0 python benchmarks/time_budget.py --minutes 1.0 --cases 24

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medkd.data.phantoms import make_phantoms


def run(args: list[str], env: dict | None = None) -> float:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "medkd", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"medkd {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medkd_budget_"))
    dataset = make_phantoms(root / "Dataset003_P3D", spatial_dims=3, num_train=opts.cases, num_test=2, seed=3)
    common = ["--max-time-min", str(opts.minutes), "--num-workers", "1", "--set", f"data.cache_dir={root / 'cache'}",
              "--set", f"train.num_threads={opts.threads}", "--set", "train.val_every=50"]
    rows = []
    teacher = root / "teacher"
    wall = run(["train", "--dataset", str(dataset), "--mode", "3d", "--run-dir", str(teacher), *common])
    rows.append(("train (teacher, 3d_fullres plan)", teacher, wall))
    student = root / "student"
    wall = run(["distill", "--teacher", str(teacher / "best.pt"), "--recipe", "logit-kd", "--run-dir", str(student),
                *common])
    rows.append(("distill logit-kd (cache fill inside)", student, wall))
    table = Table(title=f"--max-time-min {opts.minutes:g} ({opts.minutes * 60:.0f} s), {opts.cases} 3D phantoms, "
                        f"{opts.threads} thread(s)")
    for column in ("command", "steps", "wall s", "over budget", "phases (s, from result.json)"):
        table.add_column(column)
    for name, run_dir, wall in rows:
        result = json.loads((run_dir / "result.json").read_text())
        phases = ", ".join(f"{k} {v:g}" for k, v in result["phases_s"].items())
        table.add_row(name, str(result["steps"]), f"{wall:.1f}", f"{wall / (opts.minutes * 60) - 1:+.1%}", phases)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
