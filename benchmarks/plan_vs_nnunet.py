"""medkd's plan beside nnU-Net v2's on the same datasets: spacing, patch, batch, normalisation.

For each dataset a temporary ``nnUNet_raw`` layout is made (links to the images and labels, the
dataset.json), ``nnUNetv2_extract_fingerprint`` and ``nnUNetv2_plan_experiment`` (nnU-Net's default
planner, 8 GB GPU target) write ``nnUNetPlans.json``, and ``medkd plan``'s planner (CPU budget: 2,000
teacher steps in 10 minutes on 2 threads) plans the same data. Needs the ``nnunet`` extra (nnunetv2).

    taskset -c 0 python benchmarks/plan_vs_nnunet.py --acdc /work/shared/data/ACDC

Without ``--acdc`` only the 3D phantoms are compared. No network is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medkd.data.phantoms import make_phantoms
from medkd.plans import Budget
from medkd.workflows.plan import make_plans


def nnunet_layout(source: Path, raw: Path, dataset_id: int, name: str) -> Path:
    """``raw/DatasetXXX_name`` with links to ``source``'s imagesTr/labelsTr and a copy of its dataset.json."""
    target = raw / f"Dataset{dataset_id:03d}_{name}"
    target.mkdir(parents=True)
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).symlink_to((source / folder).resolve(), target_is_directory=True)
    shutil.copy(source / "dataset.json", target / "dataset.json")
    return target


def nnunet_plans(source: Path, work: Path, dataset_id: int, name: str) -> dict:
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    nnunet_layout(source, work / "raw", dataset_id, name)
    bin_dir = Path(sys.executable).parent
    for command in (["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "1"],
                    ["nnUNetv2_plan_experiment", "-d", str(dataset_id)]):
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads((work / "preprocessed" / f"Dataset{dataset_id:03d}_{name}" / "nnUNetPlans.json").read_text())


def rows(label: str, medkd_plans: dict, nnunet: dict) -> list[list[str]]:
    out = []
    for config in ("2d", "3d_fullres", "3d_lowres"):
        ours, theirs = medkd_plans["configurations"].get(config), nnunet["configurations"].get(config)
        if ours is None and theirs is None:
            continue
        def cell(plan, key):
            if plan is None:
                return "-"
            value = plan.get(key)
            if key == "spacing":
                value = plan.get("target_spacing") or plan.get("spacing")
            if isinstance(value, list):
                return " x ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value)
            return str(value)
        out.append([label, config, cell(ours, "spacing"), cell(theirs, "spacing"), cell(ours, "patch_size"),
                    cell(theirs, "patch_size"), cell(ours, "batch_size"), cell(theirs, "batch_size"),
                    cell(ours, "normalization"), cell(theirs, "normalization_schemes"),
                    "-" if ours is None else f"1/{2 ** ours['teacher']['shrink']}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acdc", type=Path, default=None, help="ACDC in nnU-Net raw format")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medkd_vs_nnunet_"))
    datasets = [("3D phantoms (24)", make_phantoms(work / "src" / "Dataset002_P3D", spatial_dims=3, num_train=24,
                                                  num_test=1, seed=3), 902, "P3D")]
    if opts.acdc is not None:
        datasets.append(("ACDC", opts.acdc, 927, "ACDC"))
    budget = Budget()
    table = Table(title=f"medkd plan (CPU: {budget.min_steps} teacher steps in {budget.minutes:g} min, "
                        f"{budget.threads} threads) vs nnU-Net v2 (8 GB GPU)")
    for column in ("dataset", "configuration", "spacing medkd", "spacing nnU-Net", "patch medkd", "patch nnU-Net",
                   "batch medkd", "batch nnU-Net", "norm medkd", "norm nnU-Net", "medkd teacher width (nnU-Net: 1)"):
        table.add_column(column)
    for label, source, dataset_id, name in datasets:
        ours = make_plans(source, cache_dir=work / "cache")
        theirs = nnunet_plans(Path(source), work / "nnunet", dataset_id, name)
        for row in rows(label, ours, theirs):
            table.add_row(*row)
    Console(width=220).print(table)
    print("spacings are (z, y, x) in mm for both; nnU-Net's are the 3D configuration's axes, its 2d plan in-plane only")


if __name__ == "__main__":
    main()
