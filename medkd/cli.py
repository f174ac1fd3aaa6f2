"""The ``medkd`` command line (typer).

Every command turns expected failures (bad dataset, bad config, missing file, existing output) into
one clear message on stderr and exit code 1; nothing is overwritten unless asked.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medkd: train teachers, distil small students, evaluate and compare them.")
console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: do not squeeze tables into 80 columns
    console.width = 160


def _expected_errors() -> tuple[type[BaseException], ...]:
    from medkd.config import ConfigError
    from medkd.data.dataset import DatasetError
    from medkd.data.io import ImageReadError
    from medkd.engine.checkpoint import CheckpointError

    return (ConfigError, DatasetError, ImageReadError, CheckpointError, FileExistsError, FileNotFoundError,
            NotADirectoryError, ValueError, FloatingPointError)


def cli_errors(func: Callable) -> Callable:
    """Report expected errors as one message and exit 1 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _expected_errors() as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("make-phantoms")
@cli_errors
def make_phantoms_cmd(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the nnU-Net raw dataset into")],
    dims: Annotated[int, typer.Option(help="2 (png images) or 3 (NIfTI volumes)")] = 3,
    num_train: Annotated[int, typer.Option(help="training cases (imagesTr)")] = 24,
    num_test: Annotated[int, typer.Option(help="held-out cases (imagesTs)")] = 8,
    num_sites: Annotated[int, typer.Option(help="acquisition sites (intensity/contrast shifts)")] = 3,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset in OUT_DIR")] = False,
) -> None:
    """Write a seeded synthetic multi-class, multi-site dataset in nnU-Net raw format."""
    from medkd.data.phantoms import make_phantoms

    root = make_phantoms(out_dir, spatial_dims=dims, num_train=num_train, num_test=num_test,
                         num_sites=num_sites, seed=seed, overwrite=overwrite)
    console.print(f"wrote {num_train} training and {num_test} test cases to {root}")


@app.command("check-data")
@cli_errors
def check_data_cmd(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw or MSD dataset folder")],
    include_test: Annotated[bool, typer.Option("--test/--no-test", help="also check imagesTs/labelsTs")] = True,
) -> None:
    """Validate a whole dataset: files, shapes, geometry, label values, NaN/Inf. Exit 1 on any problem."""
    from medkd.data.validate import check_dataset

    problems = check_dataset(dataset, include_test=include_test, progress=True)
    if problems:
        for problem in problems:
            err_console.print(f"  {problem}", highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {dataset}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {dataset} passed all checks")


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (dotted key, YAML value), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _default_run_dir(model: str, preset: str) -> Path:
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}_{model}_{preset}"


@app.command("train")
@cli_errors
def train_cmd(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (data/model/train sections)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset folder (data.dataset)")] = None,
    model: Annotated[Optional[str], typer.Option(help="registry name, see `medkd models`")] = None,
    preset: Annotated[Optional[str], typer.Option(help="teacher or student size")] = None,
    shrink: Annotated[Optional[int], typer.Option(help="width reduction t: C' = max(4, C/2^t)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="2d or 3d")] = None,
    patch_size: Annotated[Optional[str], typer.Option(help="e.g. 128,128 or 64,128,128")] = None,
    batch_size: Optional[int] = None,
    fold: Optional[int] = None,
    loss: Annotated[Optional[str], typer.Option(help="dice_ce, dice_lovasz, ce, dice, lovasz")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or sgd")] = None,
    lr: Optional[float] = None,
    max_steps: Optional[int] = None,
    max_epochs: Optional[int] = None,
    max_time_min: Annotated[Optional[float], typer.Option(help="wall-clock budget in minutes")] = None,
    val_every: Optional[int] = None,
    seed: Optional[int] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda")] = None,
    devices: Annotated[Optional[str], typer.Option(help="number of devices (DDP when > 1)")] = None,
    num_nodes: Optional[int] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Fabric strategy: auto, ddp, ...")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, 32-true, 16-mixed, bf16-mixed")] = None,
    num_workers: Optional[int] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any key: train.val_every=100")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<time>_<model>_<preset>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --run-dir from last.pt")] = False,
    verbose: bool = False,
) -> None:
    """Train a segmentation network on labels (checks the dataset first)."""
    from medkd.config import load_config
    from medkd.engine.trainer import train

    _setup_logging(verbose)
    overrides = {
        "data.dataset": str(dataset) if dataset else None, "model.name": model, "model.preset": preset,
        "model.shrink": shrink, "data.mode": mode, "data.batch_size": batch_size, "data.fold": fold,
        "data.patch_size": [int(v) for v in patch_size.split(",")] if patch_size else None,
        "data.num_workers": num_workers, "train.loss": loss, "train.optimizer": optimizer, "train.lr": lr,
        "train.max_steps": max_steps, "train.max_epochs": max_epochs, "train.max_time_min": max_time_min,
        "train.val_every": val_every, "train.seed": seed, "train.accelerator": accelerator,
        "train.devices": int(devices) if devices and devices.isdigit() else devices, "train.num_nodes": num_nodes,
        "train.strategy": strategy, "train.precision": precision, **_parse_set(set_),
    }
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --run-dir (the folder of the run to continue)")
        ignored = [k for k, v in overrides.items() if v is not None]
        if ignored or config:
            err_console.print(f"note: resuming uses {run_dir / 'config.yaml'}; ignoring {', '.join(ignored) or '--config'}")
        result = train(None, run_dir, resume=True)
    else:
        cfg = load_config(config, overrides)
        run_dir = run_dir or _default_run_dir(cfg.model.name, cfg.model.preset)
        result = train(cfg, run_dir)
    if result is not None and result.run_dir:
        console.print(f"done: {result.steps} steps in {result.elapsed_s:.0f}s, best val Dice "
                      f"{result.best_metric:.4f} at step {result.best_step}; run folder {result.run_dir}")


def _input_folder(path: Path, split: str) -> Path:
    """A dataset folder means its imagesTs (or imagesTr with --split train); else the folder itself."""
    if (path / "dataset.json").is_file():
        return path / ("imagesTr" if split == "train" else "imagesTs")
    return path


@app.command("predict")
@cli_errors
def predict_cmd(
    checkpoint: Annotated[Path, typer.Option(help="best.pt / last.pt of a run")],
    input: Annotated[Path, typer.Option("--input", "-i", help="folder of CASE_0000.ext images, or a dataset folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for CASE.ext segmentations")],
    split: Annotated[str, typer.Option(help="for a dataset folder: test (imagesTs) or train (imagesTr)")] = "test",
    tta: Annotated[bool, typer.Option(help="average over mirrored inputs")] = False,
    save_probabilities: Annotated[bool, typer.Option(help="also write CASE.npz (float16 softmax)")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    overwrite: bool = False,
) -> None:
    """Segment images; outputs keep the input's format and exact geometry."""
    from tqdm import tqdm

    from medkd.engine.inference import Predictor, predict_folder

    predictor = Predictor(checkpoint, device=device, tta=tta, amp=device.startswith("cuda"))
    written = predict_folder(predictor, _input_folder(input, split), output, save_probs=save_probabilities,
                             overwrite=overwrite, progress=lambda items: tqdm(items, desc="predict", unit="case"))
    console.print(f"wrote {len(written)} segmentation(s) to {output}")


def _class_names(labels_json: Optional[Path], ref_dir: Path) -> dict[int, str]:
    for candidate in [labels_json, ref_dir.parent / "dataset.json"]:
        if candidate and candidate.is_file():
            labels = json.loads(candidate.read_text()).get("labels")
            if isinstance(labels, dict):
                if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background"}
                    return {int(k): v for k, v in labels.items()}
                return {int(v): k for k, v in labels.items()}
    raise FileNotFoundError(f"no class names: pass --labels DATASET.json (none found beside {ref_dir})")


@app.command("evaluate")
@cli_errors
def evaluate_cmd(
    pred_dir: Annotated[Path, typer.Argument(help="predicted segmentations")],
    label_dir: Annotated[Optional[Path], typer.Argument(help="reference labels (default: DATASET/labelsTs)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset folder: use its labelsTs and labels")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="dataset.json giving the class names")] = None,
    output: Annotated[Optional[Path], typer.Option(help="where to write per_case.csv, summary.csv/json")] = None,
    workers: int = 2,
) -> None:
    """Per-case, per-class Dice, HD95 and average surface distance (spacing-aware, MONAI metrics)."""
    from medkd.evaluation import evaluate_folder

    if label_dir is None:
        if dataset is None:
            raise ValueError("give LABEL_DIR or --dataset")
        label_dir = dataset / "labelsTs"
    names = _class_names(labels or (dataset / "dataset.json" if dataset else None), label_dir)
    result = evaluate_folder(pred_dir, label_dir, names, num_workers=workers)
    out_dir = output or pred_dir / "evaluation"
    paths = result.save(out_dir)
    console.print(result.table(title=f"{pred_dir} vs {label_dir}"))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")


@app.command("models")
def models_cmd(
    dims: Annotated[int, typer.Option(help="spatial dims for the parameter count")] = 2,
) -> None:
    """List the registry's architectures with teacher/student parameter counts."""
    from medkd.evaluation.report import comparison_table
    from medkd.models import count_parameters, create, list_models

    rows = []
    for name in list_models():
        counts = {p: count_parameters(create(name, dims, 1, 4, preset=p)) for p in ("teacher", "student")}
        rows.append({"name": name, "teacher": counts["teacher"], "student": counts["student"],
                     "ratio": counts["teacher"] / counts["student"]})
    console.print(comparison_table(rows, [("name", "model", "s"), ("teacher", "teacher params", ",d"),
                                          ("student", "student params", ",d"), ("ratio", "ratio", ".1f")],
                                   title=f"medkd models ({dims}D, 1 channel in, 4 classes)"))


@app.command("demo")
@cli_errors
def demo_cmd(
    out: Annotated[Path, typer.Option(help="parent folder of the demo run")] = Path("demo_runs"),
    teacher_minutes: Annotated[float, typer.Option(help="training budget of the teacher")] = 1.5,
    student_minutes: Annotated[float, typer.Option(help="training budget of the student")] = 1.5,
) -> None:
    """Synthetic end-to-end run: phantoms -> teacher and student -> held-out evaluation table."""
    from medkd.demo import run_demo

    _setup_logging(False)
    run_demo(out, teacher_minutes=teacher_minutes, student_minutes=student_minutes, console=console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
