"""Bundle vs checkpoint: Dice of `medkd predict --bundle` (onnxruntime) and `--checkpoint` (PyTorch).

Exports RUN (a run folder's best.pt, or a checkpoint) to ``OUT/bundle``, predicts the dataset's test
cases (imagesTs, or imagesTr with ``--split train``) both ways into ``OUT/pytorch`` and ``OUT/onnx``,
evaluates both against the labels and prints per-class and mean foreground Dice to 3 decimals, the
fraction of voxels with the same label, the largest per-case disagreement and the time of each path.
Writes ``OUT/parity.json``. Issue 11 asks for the same Dice to 3 decimals and >= 99.9% equal labels.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/deploy_parity.py \\
        --run /work/bench/student/ --dataset ../shared/data/ACDC/Dataset027_ACDC --out bench_runs/deploy_parity

Not a test: two full predictions of the test set (minutes for ACDC's 50 volumes on one core).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (its best.pt) or checkpoint")
    parser.add_argument("--dataset", type=Path, required=True, help="nnU-Net raw dataset folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    console = Console()
    bundle = export_bundle(args.run, args.out / "bundle", force=True).bundle
    checkpoint = args.run / "best.pt" if args.run.is_dir() else args.run
    labels_dir = args.dataset / ("labelsTr" if args.split == "train" else "labelsTs")
    rows, seconds, written = {}, {}, {}
    for name, model in [("pytorch", {"checkpoint": checkpoint}), ("onnx", {"checkpoint": None, "bundle": bundle})]:
        start = time.perf_counter()
        _, written[name] = predict(model.pop("checkpoint"), args.dataset, args.out / name, split=args.split, tta=args.tta,
                             overwrite=True, **model)
        seconds[name] = time.perf_counter() - start
        result, _ = evaluate_predictions(args.out / name, labels_dir, dataset=args.dataset)
        rows[name] = {cls: values["dice_mean"] for cls, values in result.summary().items()}
    equal, worst = _agreement(written["pytorch"], args.out / "onnx")
    table = Table(title=f"{checkpoint} vs {bundle} on {input_folder(args.dataset, args.split)}")
    table.add_column("class")
    for name in rows:
        table.add_column(f"Dice {name}", justify="right")
    table.add_column("same to 3 decimals")
    for cls in rows["pytorch"]:
        a, b = rows["pytorch"][cls], rows["onnx"][cls]
        table.add_row(cls, f"{a:.3f}", f"{b:.3f}", "yes" if f"{a:.3f}" == f"{b:.3f}" else "NO")
    console.print(table)
    console.print(f"equal labels: {100 * equal:.3f}% of voxels (worst case {100 * worst:.3f}%); "
                  f"time: PyTorch {seconds['pytorch']:.1f} s, onnxruntime {seconds['onnx']:.1f} s")
    report = {"checkpoint": str(checkpoint), "bundle": str(bundle), "dice": rows, "equal_labels": equal,
              "worst_case_equal_labels": worst, "seconds": seconds,
              "same_dice_3_decimals": all(f"{rows['pytorch'][c]:.3f}" == f"{rows['onnx'][c]:.3f}" for c in rows["pytorch"])}
    (args.out / "parity.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
