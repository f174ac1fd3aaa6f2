"""Bundle vs checkpoint: Dice of `medkd predict --bundle` (onnxruntime) and `--checkpoint` (PyTorch).

Exports RUN (a run folder's best.pt, or a checkpoint) to ``OUT/bundle``, predicts the dataset's test
cases (imagesTs, or imagesTr with ``--split train``) both ways into ``OUT/pytorch`` and ``OUT/onnx``,
evaluates both against the labels and prints per-class and mean foreground Dice to 3 decimals, the
fraction of voxels with the same label, the largest per-case disagreement and the time of each path.
Writes ``OUT/parity.json``. Issue 11 asks for the same Dice to 3 decimals and >= 99.9% equal labels.

With ``--quantize int8`` (or ``--fp16``) it compares the fp32 bundle with an int8 (fp16) bundle of
the same run instead (``OUT/bundle_int8``, calibrated on the run's own training cases; predictions in
``OUT/fp32`` and ``OUT/int8``): the Dice change of quantization (issue 11: <= 0.5 Dice points).

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/deploy_parity.py \\
        --run /work/bench/student/ --dataset ../shared/data/ACDC --out bench_runs/deploy_parity
    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/deploy_parity.py --quantize int8 \\
        --run /work/bench/student/ --dataset ../shared/data/ACDC --out bench_runs/deploy_int8

Not a test: two full predictions of the test set (minutes for ACDC's 40 test volumes on one core).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medkd.data.io import read_image
from medkd.workflows.evaluate import evaluate_predictions
from medkd.deploy.quantize import check_precision
from medkd.deploy.runtime import predict_with_bundle
from medkd.workflows.export import export_bundle
from medkd.workflows.predict import input_folder, predict


def _agreement(files: list[Path], other_dir: Path) -> tuple[float, float]:
    """Fraction of voxels with equal labels in ``files`` and their namesakes in ``other_dir``, and the lowest case's."""
    same = total = 0
    worst = 1.0
    for path in files:
        a, b = read_image(path)[0], read_image(other_dir / path.name)[0]
        equal = int((a == b).sum())
        same, total, worst = same + equal, total + a.size, min(worst, equal / a.size)
    return same / max(total, 1), worst


def _paths(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The two ways to predict: PyTorch and the fp32 bundle, or the fp32 and the converted bundle."""
    bundle = export_bundle(args.run, args.out / "bundle", force=True).bundle
    if args.precision == "fp32":
        checkpoint = args.run / "best.pt" if args.run.is_dir() else args.run
        return [("pytorch", {"checkpoint": checkpoint}), ("onnx", {"bundle": bundle})]
    converted = export_bundle(args.run, args.out / f"bundle_{args.precision}", force=True, precision=args.precision)
    return [("fp32", {"bundle": bundle}), (args.precision, {"bundle": converted.bundle})]


def _predict(model: dict, args: argparse.Namespace, out: Path) -> list[Path]:
    """Segment the split into ``out``: a checkpoint as `medkd predict` does, a bundle with ``--threads``."""
    if "bundle" in model:
        return predict_with_bundle(model["bundle"], input_folder(args.dataset, args.split), out, tta=args.tta,
                                   overwrite=True, threads=args.threads)
    return predict(model["checkpoint"], args.dataset, out, split=args.split, tta=args.tta, overwrite=True)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (its best.pt) or checkpoint")
    parser.add_argument("--dataset", type=Path, required=True, help="nnU-Net raw dataset folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--quantize", choices=["int8"], help="compare the fp32 bundle with an int8 one")
    parser.add_argument("--fp16", action="store_true", help="compare the fp32 bundle with an fp16 one")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the bundles")
    args = parser.parse_args()
    args.precision = check_precision(args.quantize, args.fp16)
    console = Console()
    labels_dir = args.dataset / ("labelsTr" if args.split == "train" else "labelsTs")
    rows, seconds, written = {}, {}, {}
    paths = _paths(args)
    for name, model in paths:
        start = time.perf_counter()
        written[name] = _predict(model, args, args.out / name)
        seconds[name] = time.perf_counter() - start
        result, _ = evaluate_predictions(args.out / name, labels_dir, dataset=args.dataset)
        rows[name] = {cls: values["dice_mean"] for cls, values in result.summary().items()}
    (a_name, a_model), (b_name, b_model) = paths
    equal, worst = _agreement(written[a_name], args.out / b_name)
    table = Table(title=f"{next(iter(a_model.values()))} vs {next(iter(b_model.values()))} on "
                        f"{input_folder(args.dataset, args.split)}")
    table.add_column("class")
    for name in rows:
        table.add_column(f"Dice {name}", justify="right")
    table.add_column(f"{b_name} - {a_name} (points)", justify="right")
    table.add_column("same to 3 decimals")
    for cls in rows[a_name]:
        a, b = rows[a_name][cls], rows[b_name][cls]
        table.add_row(cls, f"{a:.3f}", f"{b:.3f}", f"{100 * (b - a):+.2f}", "yes" if f"{a:.3f}" == f"{b:.3f}" else "NO")
    console.print(table)
    console.print(f"equal labels: {100 * equal:.3f}% of voxels (worst case {100 * worst:.3f}%); time: "
                  + ", ".join(f"{name} {seconds[name]:.1f} s" for name in seconds))
    report = {"paths": {name: {k: str(v) for k, v in model.items()} for name, model in paths}, "dice": rows,
              "equal_labels": equal, "worst_case_equal_labels": worst, "seconds": seconds,
              "same_dice_3_decimals": all(f"{rows[a_name][c]:.3f}" == f"{rows[b_name][c]:.3f}" for c in rows[a_name])}
    (args.out / "parity.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
