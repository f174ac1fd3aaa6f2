"""An nnU-Net v2 model as a medkd teacher on ACDC: train briefly with nnunetv2, import, compare predictions.

Steps (everything under ``--work``; run it pinned to one core, e.g. ``taskset -c 0``):

1. ``nnUNetv2_plan_and_preprocess`` of ACDC (``../shared/data/ACDC``, nnU-Net raw format, linked as
   ``Dataset027_ACDC``), 2d configuration only; the dataset's ``splits_final.json`` is used for fold 0;
2. a short nnU-Net training of fold 0 on the CPU (nnU-Net's own trainer, network and augmentation, with
   ``--epochs`` x ``--iterations`` steps of batch ``--batch-size``: far from a converged nnU-Net); with
   ``--width-divisor D`` the network is nnU-Net's 2d one at 1/D of its features per stage (a ``2d_w<D>``
   configuration that inherits the rest from ``2d`` in nnU-Net's own plans file), so that a CPU can train
   it to a usable teacher;
3. ``nnUNetv2_predict`` on ``--test-cases`` test volumes (no TTA unless ``--tta``);
4. ``medkd import-nnunet`` and ``medkd predict`` of the same volumes with the imported teacher;
5. a table: per case Dice of each against the reference labels, and Dice of medkd's segmentation against
   nnU-Net's (agreement), mean over cases and classes; the share of voxels with the same label and the
   largest and mean absolute difference of the two softmax probability maps;
6. with ``--distill-steps N``: ``medkd distill`` of a UNet t=4 student from the imported teacher set
   (``balanced-kd``, N steps, nnU-Net's validation Dice recorded on import) and its test Dice.

A model this short segments poorly, so Dice against the reference says little; the agreement of the two
predictors (labels and probabilities) is the measurement.

nnunetv2 must be installed beside medkd (pinned to the CPU torch wheel); it is not a medkd dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC"
DATASET = "Dataset027_ACDC"
CLASSES = {1: "RV", 2: "MYO", 3: "LV"}


def _env(work: Path) -> dict[str, str]:
    env = {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
    os.environ.update(env)
    return {**os.environ, **env}


def _run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, env=env, check=True)
    return time.time() - start


def plan_and_preprocess(work: Path, env: dict[str, str]) -> None:
    raw = work / "raw" / DATASET
    raw.parent.mkdir(parents=True, exist_ok=True)
    if not raw.exists():
        raw.symlink_to(ACDC.resolve(), target_is_directory=True)
    if not (work / "preprocessed" / DATASET / "nnUNetPlans.json").is_file():
        bindir = Path(sys.executable).parent
        _run([str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", "27", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    shutil.copyfile(ACDC / "splits_final.json", work / "preprocessed" / DATASET / "splits_final.json")


def add_narrow_configuration(work: Path, divisor: int, batch_size: int) -> str:
    """The configuration to train: ``2d``, or for ``divisor`` > 1 a ``2d_w<divisor>`` configuration added to
    nnUNetPlans.json that inherits everything from ``2d`` (preprocessed data, patch, stages, strides) but
    divides the features per stage by ``divisor`` and sets ``batch_size``: nnU-Net's network at a width a
    CPU can train, described in nnU-Net's own plans format (``inherits_from``)."""
    if divisor == 1:
        return "2d"
    path = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(path.read_text())
    name = f"2d_w{divisor}"
    architecture = json.loads(json.dumps(plans["configurations"]["2d"]["architecture"]))
    kwargs = architecture["arch_kwargs"]
    kwargs["features_per_stage"] = [max(4, f // divisor) for f in kwargs["features_per_stage"]]
    plans["configurations"][name] = {"inherits_from": "2d", "architecture": architecture, "batch_size": batch_size}
    path.write_text(json.dumps(plans, indent=1))
    return name


def _trainer_arguments(work: Path, configuration: str) -> dict:
    """Constructor arguments of nnU-Net's trainer for fold 0 of ``configuration`` on the CPU."""
    import torch

    preprocessed = work / "preprocessed" / DATASET
    plans = {**json.loads((preprocessed / "nnUNetPlans.json").read_text()), "continue_training": False}
    return {"plans": plans, "configuration": configuration, "fold": 0,
            "dataset_json": json.loads((preprocessed / "dataset.json").read_text()), "device": torch.device("cpu")}


def train(work: Path, configuration: str, epochs: int, iterations: int, batch_size: int) -> tuple[Path, bool]:
    """Fold 0 of ``configuration`` with nnU-Net's trainer, shortened; returns the results folder and
    whether it trained now (a fold already trained under ``--work`` is reused)."""
    import torch
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    class nnUNetTrainer(trainer_module.nnUNetTrainer):  # noqa: N801 - nnU-Net's name, so nnUNetv2_predict finds it
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):  # nnU-Net records these arguments by name
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epochs, iterations, 2

        def _set_batch_size_and_oversample(self):
            self.batch_size = batch_size

    folder = work / "results" / DATASET / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder, False
    torch.set_num_threads(1)
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (planning needs >= 1, training takes 0)
    trainer = nnUNetTrainer(**_trainer_arguments(work, configuration))
    trainer.run_training()
    trainer.perform_actual_validation(False)  # as nnUNetv2_train does: fold_0/validation/summary.json
    return folder, True


def validate(work: Path, folder: Path, configuration: str) -> None:
    """nnU-Net's final validation of a fold trained by an earlier run without it (its val Dice is what
    ``medkd import-nnunet`` records, and what distillation's weaker-teacher check compares)."""
    if (folder / "fold_0" / "validation" / "summary.json").is_file():
        return
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(1)
    trainer = nnUNetTrainer(**_trainer_arguments(work, configuration))
    trainer.initialize()
    trainer.load_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    trainer.perform_actual_validation(False)


def distill_student(work: Path, steps: int, inputs: Path, cases: list[str], env: dict[str, str]) -> dict:
    """``medkd distill`` a UNet t=4 student from the imported teacher set with ``balanced-kd`` for ``steps``
    steps (all training cases labelled), then its test Dice on ``cases``."""
    medkd = [sys.executable, "-m", "medkd"]
    run = work / f"student_t4_balanced-kd_{steps}"
    started = time.time()
    if not (run / "result.json").is_file():
        _run([*medkd, "distill", "--teacher", str(work / "teachers"), "--dataset", str(ACDC), "--mode", "2d",
              "--shrink", "4", "--recipe", "balanced-kd", "--max-steps", str(steps), "--run-dir", str(run),
              *(["--resume"] if (run / "last.pt").is_file() else [])], env)
    shutil.rmtree(work / "pred_student", ignore_errors=True)
    _run([*medkd, "predict", "--checkpoint", str(run / "best.pt"), "-i", str(inputs), "-o",
          str(work / "pred_student")], env)
    from medkd.data.io import read_image

    dice = [[_dice(read_image(work / "pred_student" / f"{case}.nii.gz")[0],
                   read_image(ACDC / "labelsTs" / f"{case}.nii.gz")[0], c) for c in CLASSES] for case in cases]
    result = json.loads((run / "result.json").read_text())
    return {"student_dice": np.mean(dice, axis=0).tolist(), "student_steps": result["steps"],
            "student_val_dice": result.get("best_metric"), "student_s": time.time() - started}


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2 * (x & y).sum() / total)


def compare(cases: list[str], nnunet_dir: Path, medkd_dir: Path) -> dict[str, float]:
    from medkd.data.io import read_image

    rows = []
    for case in cases:
        reference = read_image(ACDC / "labelsTs" / f"{case}.nii.gz")[0]
        theirs = read_image(nnunet_dir / f"{case}.nii.gz")[0]
        ours = read_image(medkd_dir / f"{case}.nii.gz")[0]
        with np.load(nnunet_dir / f"{case}.npz") as a, np.load(medkd_dir / f"{case}.npz") as b:
            gap = np.abs(a["probabilities"].astype(np.float32) - b["probabilities"].astype(np.float32))
        rows.append([[_dice(theirs, reference, c) for c in CLASSES], [_dice(ours, reference, c) for c in CLASSES],
                     [_dice(ours, theirs, c) for c in CLASSES], float((ours == theirs).mean()),
                     float(gap.max()), float(gap.mean())])
    theirs, ours, agree = (np.mean([r[i] for r in rows], axis=0) for i in range(3))
    return {"cases": len(rows), "nnunet": theirs.tolist(), "medkd": ours.tolist(), "agreement": agree.tolist(),
            "voxels_equal": float(np.mean([r[3] for r in rows])), "probability_max_abs_diff": max(r[4] for r in rows),
            "probability_mean_abs_diff": float(np.mean([r[5] for r in rows]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench_runs/nnunet_teacher"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width-divisor", type=int, default=1, help="train nnU-Net's 2d network with its "
                        "features per stage divided by this (a configuration 2d_w<D> added to the plans; 1: 2d)")
    parser.add_argument("--test-cases", type=int, default=10, help="first N test volumes (0: all 40)")
    parser.add_argument("--tta", action="store_true", help="mirroring TTA in both predictors")
    parser.add_argument("--distill-steps", type=int, default=0, help="then distil a UNet t=4 student from the "
                        "imported teacher with balanced-kd for this many steps and score it (0: skip)")
    args = parser.parse_args()
    if not (ACDC / "dataset.json").is_file():
        sys.exit(f"ACDC not found at {ACDC}")
    work = args.work.resolve()
    env = _env(work)
    bindir = Path(sys.executable).parent
    plan_and_preprocess(work, env)
    start = time.time()
    configuration = add_narrow_configuration(work, args.width_divisor, args.batch_size)
    results, trained = train(work, configuration, args.epochs, args.iterations, args.batch_size)
    validate(work, results, configuration)
    train_s = time.time() - start if trained else None
    images = sorted((ACDC / "imagesTs").glob("*_0000.nii.gz"))
    images = images[: args.test_cases] if args.test_cases else images
    cases = [p.name[: -len("_0000.nii.gz")] for p in images]
    inputs = work / "test_inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for path in images:
        (inputs / path.name).symlink_to(path.resolve())
    for out in ("pred_nnunet", "pred_medkd", "teachers"):
        shutil.rmtree(work / out, ignore_errors=True)
    tta = [] if args.tta else ["--disable_tta"]
    nnunet_s = _run([str(bindir / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(work / "pred_nnunet"), "-d", "27",
                     "-c", configuration, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities",
                     *tta], env)
    medkd = [sys.executable, "-m", "medkd"]
    import_s = _run([*medkd, "import-nnunet", str(results), "--configuration", configuration, "--folds", "0",
                     "-o", str(work / "teachers")], env)
    medkd_s = _run([*medkd, "predict", "--checkpoint", str(work / "teachers"), "-i", str(inputs), "-o",
                    str(work / "pred_medkd"), "--save-probabilities", *(["--tta"] if args.tta else [])], env)
    summary = compare(cases, work / "pred_nnunet", work / "pred_medkd")
    if args.distill_steps:
        summary.update(distill_student(work, args.distill_steps, inputs, cases, env))
    summary.update(train_s=train_s, nnunet_predict_s=nnunet_s, import_s=import_s, medkd_predict_s=medkd_s,
                   epochs=args.epochs, iterations=args.iterations, batch_size=args.batch_size, tta=args.tta,
                   configuration=configuration)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    trained_for = f"{train_s / 60:.1f} min" if trained else "trained by an earlier run, reused"
    print(f"\nnnU-Net {configuration} fold 0, {args.epochs} x {args.iterations} steps of batch {args.batch_size} "
          f"({trained_for}); {summary['cases']} ACDC test volumes; TTA {'on' if args.tta else 'off'}")
    print("| predictor | Dice RV | Dice MYO | Dice LV | mean Dice | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, key, seconds in (("nnUNetv2_predict", "nnunet", nnunet_s), ("medkd predict (imported)", "medkd",
                                                                          medkd_s)):
        dice = summary[key]
        print(f"| {name} | {dice[0]:.4f} | {dice[1]:.4f} | {dice[2]:.4f} | {np.mean(dice):.4f} | {seconds:.0f} |")
    agree = summary["agreement"]
    print(f"| agreement (Dice medkd vs nnU-Net) | {agree[0]:.4f} | {agree[1]:.4f} | {agree[2]:.4f} | "
          f"{np.mean(agree):.4f} | |")
    print(f"voxels with the same label: {summary['voxels_equal']:.5f}; softmax probabilities: max |difference| "
          f"{summary['probability_max_abs_diff']:.4f}, mean {summary['probability_mean_abs_diff']:.2e} "
          "(medkd stores float16)")
    if args.distill_steps:
        dice = summary["student_dice"]
        print(f"| student (UNet t=4, balanced-kd, {summary['student_steps']} steps) | {dice[0]:.4f} | {dice[1]:.4f} | "
              f"{dice[2]:.4f} | {np.mean(dice):.4f} | {summary['student_s']:.0f} |")


if __name__ == "__main__":
    main()
