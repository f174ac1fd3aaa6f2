"""ACDC 2D teacher ablation: which training settings make the best teacher in a fixed wall-clock budget.

Each variant changes one setting of the reference recipe (UNet teacher preset, 128x128 patches, batch 8,
no augmentation, AdamW lr 3e-3, poly schedule over the budget, foreground oversampling 0.33, best
checkpoint by validation Dice) and trains for the same number of minutes with the same thread count.
Every run decides its post-processing on the 20 validation cases (as ``medkd train`` does); the table
shows the post-processed validation Dice (what a user may choose by) beside the test Dice and HD95 on
the 40 held-out test volumes (what is reported). Choose by the validation column, never by test.
The ``*-ddp2`` variants train as two data-parallel CPU processes of one thread each (Fabric, gloo; Fabric
re-runs this script for the second process): run them alone, after the other variants of ``--out``.

    taskset -c 1 python benchmarks/acdc_2d_teacher_ablation.py --minutes 12 --threads 1 \\
        --variants base shrink1 batch4 lr1e-2 light-aug sgd --out bench_runs/teacher_ablation

Not a test: each variant takes ``minutes`` plus a few minutes of evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from rich.console import Console

from medkd.config import build_config
from medkd.engine.inference import Predictor
from medkd.engine.trainer import train
from medkd.evaluation.report import comparison_table, write_csv, write_json

from acdc_2d_supervised import DEFAULT_DATA, newest_input, run_config, test_scores

DDP2 = {"train.accelerator": "cpu", "train.devices": 2, "train.strategy": "ddp", "train.num_threads": 1,
        "data.num_workers": 1}
#: variant name -> (what it changes, dotted overrides of the reference run config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("reference: batch 8, no aug, AdamW 3e-3", {}),
    "shrink1": ("half width (1.6M parameters)", {"model.shrink": 1}),
    "shrink2": ("quarter width (407k parameters)", {"model.shrink": 2}),
    "batch4": ("batch 4", {"data.batch_size": 4}),
    "batch16": ("batch 16", {"data.batch_size": 16}),
    "lr1e-2": ("AdamW lr 1e-2", {"train.lr": 1e-2}),
    "lr1e-3": ("AdamW lr 1e-3", {"train.lr": 1e-3}),
    "light-aug": ("medkd's default augmentation, no flips", {"data.augment": {"flip_prob": 0.0}}),
    "sgd": ("SGD lr 1e-2, Nesterov 0.99 (nnU-Net)", {"train.optimizer": "sgd", "train.lr": 1e-2}),
    "fg0.66": ("foreground oversampling 0.66", {"data.foreground_oversample": 0.66}),
    "patch224": ("224x224 patches (near whole slice), batch 4", {"data.patch_size": [224, 224], "data.batch_size": 4}),
    # both cores as two data-parallel processes (gloo) of one thread each: global batch 8 as in shrink2
    "shrink2-ddp2": ("quarter width, 2 CPU processes x batch 4 (DDP)", {"model.shrink": 2, "data.batch_size": 4,
                     **DDP2}),
    "shrink2-ddp2-b16": ("quarter width, 2 CPU processes x batch 8 (DDP)", {"model.shrink": 2, **DDP2}),
}


def variant_tree(dataset: Path, minutes: float, cache: Path, seed: int, threads: int, overrides: dict) -> dict:
    """The reference run config with ``overrides`` (dotted keys) applied."""
    tree = copy.deepcopy(run_config(dataset, "teacher", minutes, cache, seed, augment=False, batch_size=8))
    tree["train"]["num_threads"] = threads
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return tree


def validation_dice(run_dir: Path) -> tuple[float, float]:
    """Mean foreground Dice on the run's validation cases without and with its post-processing."""
    record = json.loads((run_dir / "postprocessing.json").read_text())
    classes = record["classes"].values()
    without = sum(c["dice_without"] for c in classes) / len(classes)
    final = sum(c["dice_with"] if c["applied"] else c["dice_without"] for c in classes) / len(classes)
    return without, final


def run_variant(name: str, args: argparse.Namespace, console: Console) -> dict:
    description, overrides = VARIANTS[name]
    run_dir = args.out / name
    if not (run_dir / "result.json").is_file():
        tree = variant_tree(args.data, args.minutes, args.out / "cache", args.seed, args.threads, overrides)
        result = train(build_config(tree), run_dir, resume=(run_dir / "last.pt").is_file())
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            raise SystemExit(0)  # a DDP variant's other process (Fabric re-ran this script): rank 0 scores
        console.print(f"{name}: {result.steps} steps in {result.elapsed_s / 60:.1f} min")
    checkpoint = run_dir / "best.pt"
    row = test_scores(name, Predictor(checkpoint), args.data, args.out, reuse_after=newest_input(checkpoint))
    stored = json.loads((run_dir / "result.json").read_text())
    val_raw, val_pp = validation_dice(run_dir)
    row.update({"variant": description, "steps": stored["steps"], "best_step": stored.get("best_step"),
                "val_dice_raw": val_raw, "val_dice": val_pp,
                "params": sum(p.numel() for p in Predictor(checkpoint).model.parameters())})
    return row


COLUMNS = [("model", "variant", "s"), ("variant", "changes", "s"), ("params", "params", ",d"),
           ("steps", "steps", ",d"), ("best_step", "best step", "d"), ("val_dice_raw", "val Dice", ".3f"),
           ("val_dice", "val Dice pp", ".3f"), ("dice_RV", "test RV", ".3f"), ("dice_MYO", "test MYO", ".3f"),
           ("dice_LV", "test LV", ".3f"), ("mean_dice", "test Dice", ".3f"), ("hd95", "test HD95", ".2f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["base", "shrink1", "batch4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_teacher_ablation"))
    args = parser.parse_args()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"ACDC not found at {args.data} (expected nnU-Net raw format with dataset.json)")
    torch.set_num_threads(args.threads)
    console = Console(width=220)
    rows = [run_variant(name, args, console) for name in args.variants]
    title = f"ACDC 2D teacher ablation: {args.minutes} min, {args.threads} thread(s) per run, seed {args.seed}"
    console.print(comparison_table(rows, COLUMNS, title=title))
    best = max(rows, key=lambda r: r["val_dice"])
    console.print(f"chosen on validation: {best['model']} (val Dice {best['val_dice']:.3f}; "
                  f"test {best['mean_dice']:.3f})")
    write_csv(rows, args.out / "summary.csv")
    write_json(rows, args.out / "summary.json")


if __name__ == "__main__":
    main()
