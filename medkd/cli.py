"""The ``medkd`` command line (typer): a thin shell over :mod:`medkd.workflows` and the floors below.

Every command turns expected failures (bad dataset, bad config, missing or unwritable file, full disk,
existing output) into one clear message on stderr and exit code 1 (:mod:`medkd.cli_errors`); nothing
is overwritten unless asked.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from medkd.cli_errors import guard_commands

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medkd: train teachers, distil small students, evaluate and compare them.")
console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: do not squeeze tables into 80 columns
    console.width = 160


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("make-phantoms")
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
def check_data_cmd(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw or MSD dataset folder")],
    include_test: Annotated[bool, typer.Option("--test/--no-test", help="also check imagesTs/labelsTs")] = True,
) -> None:
    """Validate a whole dataset: files, image sizes, shapes, geometry, label values, NaN/Inf, splits_final.json,
    foreground and constant images. Exit 1 on any error; warnings (suspicious data) are listed only."""
    from medkd.data.validate import check_dataset, errors

    problems = check_dataset(dataset, include_test=include_test, progress=True)
    for problem in problems:
        err_console.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)  # "[kind]" is no style
    if failed := len(errors(problems)):
        err_console.print(f"[bold red]{failed} error(s)[/], {len(problems) - failed} warning(s) in {dataset}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {dataset} passed all checks" + (f" with {len(problems)} warning(s)" if problems else ""))


def _train_options(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (data/model/train sections)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset folder (data.dataset)")] = None,
    model: Annotated[Optional[str], typer.Option(help="registry name, see `medkd models`")] = None,
    preset: Annotated[Optional[str], typer.Option(help="teacher or student (8x narrower; a 2D unet student uses ReLU)")] = None,
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
    run_dir: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<time>-<random>_<model>_<preset>)")] = None,
    data_fraction: Annotated[Optional[float], typer.Option(help="train on a seeded subset of the training cases")] = None,
    labeled_cases: Annotated[Optional[int], typer.Option(help="few labels: keep the labels of N training cases "
                                                         "(whole data.group_regex groups); distill uses the "
                                                         "other cases as unlabelled images")] = None,
    labeled_fraction: Annotated[Optional[float], typer.Option(help="few labels: like --labeled-cases, as a "
                                                              "fraction of the training cases")] = None,
    unlabeled: Annotated[Optional[list[Path]], typer.Option(metavar="DIR", help="distill: folder of unlabelled "
                                                            "images (CASE_XXXX<ending>); repeatable")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --run-dir from last.pt")] = False,
    plan: Annotated[Optional[Path], typer.Option(help="plans.json of `medkd plan` (default: plan from the dataset)")] = None,
    configuration: Annotated[Optional[str], typer.Option(help="of the plan: 2d, 3d_fullres or 3d_lowres")] = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """The options shared by train and distill (collected, not acted on)."""
    return dict(locals())


def _run_training(opts: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Resolve the config from --config, flags and --set (over ``defaults``); run it, or resume --run-dir."""
    from medkd.workflows.train import run_from_options

    _setup_logging(opts["verbose"])
    result = run_from_options(opts, defaults, note=err_console.print)
    if result is not None and result.run_dir:
        console.print(f"done: {result.steps} steps in {result.elapsed_s:.0f}s, best val Dice "
                      f"{result.best_metric:.4f} at step {result.best_step}; run folder {result.run_dir}")


def _command_with_training_options(func: Callable) -> Callable:
    """Give ``func`` (whose own parameters come first) every option of ``_train_options`` too.

    ``func`` receives its own arguments plus ``opts``, the dict of the shared options, so train and
    distill share one option list and one code path.
    """
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "opts"]
    shared = list(inspect.signature(_train_options).parameters.values())
    hints = {**typing.get_type_hints(_train_options, include_extras=True),
             **typing.get_type_hints(func, include_extras=True)}

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        own_args = {p.name: kwargs.pop(p.name) for p in own}
        return func(**own_args, opts=kwargs)

    params = [p.replace(annotation=hints[p.name]) for p in [*own, *shared]]  # resolved, not strings
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@app.command("train")
@_command_with_training_options
def train_cmd(opts: dict[str, Any]) -> None:
    """Train a segmentation network on labels (checks the dataset first).

    SIGTERM or Ctrl-C writes last.pt after the current step and exits with 143 / 130; --resume continues.
    """
    _run_training(opts)


@app.command("distill")
@_command_with_training_options
def distill_cmd(
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint, or a teacher set (teachers.json or its "
                                                         "folder); frozen; not needed with --resume")] = None,
    student: Annotated[str, typer.Option(help="student registry name (size via --preset/--shrink; default preset student)")] = "unet",
    recipe: Annotated[str, typer.Option(help="shipped recipe name (see `medkd recipes`) or a YAML file")] = "logit-kd",
    opts: dict[str, Any] = None,
) -> None:
    """Distil frozen teacher(s) into a student with a recipe; same data/budget/resume/DDP options as train.

    Without --config, data settings (dataset, mode, patch size, normalisation...) default to the
    (first) teacher's run; flags and --set override them. Logit-only recipes read the teachers'
    combined outputs from the teacher-output cache (computed once); feature recipes run them live.
    """
    from medkd.workflows.distill import distill_defaults

    defaults = None if opts["resume"] else distill_defaults(teacher, student, recipe, teacher_data=opts["config"] is None)
    _run_training(opts, defaults)


def _comma_list(value: Optional[str]) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",")]


@app.command("train-teachers")
@_command_with_training_options
def train_teachers_cmd(
    kind: Annotated[Optional[str], typer.Option(help="uniform (seeds), diverse (models x losses grid), subset "
                                                "(disjoint case subsets) or multitask (default: uniform)")] = None,
    members: Annotated[Optional[int], typer.Option(help="uniform/multitask: number of teachers (default: 3)")] = None,
    models: Annotated[Optional[str], typer.Option(help="diverse: comma list of models (default: unet,basicunet,"
                                                  "segresnet); other kinds: one model (like --model)")] = None,
    losses: Annotated[Optional[str], typer.Option(help="diverse: comma list of losses (default: dice_ce,ce)")] = None,
    subsets: Annotated[Optional[int], typer.Option(help="subset: number K of disjoint subsets (default: 3)")] = None,
    group_by: Annotated[Optional[str], typer.Option(help="subset: case_metadata.json key whose groups stay whole, "
                                                    "e.g. site (default: random partition)")] = None,
    aux_weight: Annotated[Optional[float], typer.Option(help="multitask: weight of the reconstruction MSE "
                                                        "(default: 0.5)")] = None,
    aux_tap: Annotated[Optional[str], typer.Option(help="multitask: module to reconstruct from (see "
                                                   "`medkd inspect-model`) (default: the bottleneck)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="teacher-set folder: plan.json, members/, teachers.json "
                                                "(default: runs/<time>-<random>_teachers_<kind>)")] = None,
    opts: dict[str, Any] = None,
) -> None:
    """Train a set of teachers (one run per member) and write their manifest OUT/teachers.json.

    The options of `medkd train` set the base config shared by every member.

    --resume --out OUT continues a set: finished members are skipped, an interrupted one resumes, the others start.

    Options given with --resume must match OUT/plan.json; with none, the stored plan is used.
    """
    from medkd.workflows.train import run_overrides
    from medkd.workflows.train_teachers import run_teacher_set

    _setup_logging(opts["verbose"])
    if opts["run_dir"] is not None and out is not None and opts["run_dir"] != out:
        raise ValueError("give the teacher-set folder once: --out (--run-dir is an alias)")
    teachers = run_teacher_set(out or opts["run_dir"], kind, opts["config"], run_overrides(opts, note=err_console.print),
                               resume=opts["resume"], members=members, models=_comma_list(models),
                               losses=_comma_list(losses), subsets=subsets, aux_weight=aux_weight,
                               aux_tap=aux_tap, group_by=None if group_by == "random" else group_by)
    if teachers is None:  # a non-zero rank of a distributed run
        return
    for member in teachers.members:
        dice = "n/a" if member.val_dice is None else f"{member.val_dice:.4f}"
        console.print(f"  {member.name}: {member.model}, {member.loss}, seed {member.seed}, best val Dice {dice}")
    console.print(f"done: {len(teachers)} {teachers.kind} teacher(s); manifest {teachers.source}")


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped distillation recipes with their terms and weights."""
    from medkd.workflows.catalog import recipes_table

    console.print(recipes_table())


@app.command("inspect-model")
def inspect_model_cmd(
    name: Annotated[str, typer.Argument(help="registry name, or a checkpoint (e.g. an imported nnU-Net fold)")],
    dims: Annotated[int, typer.Option(help="2 or 3")] = 2,
    preset: str = "teacher",
    in_channels: int = 1,
    out_channels: int = 4,
    input_size: Annotated[Optional[int], typer.Option(help="edge of the dummy input")] = None,
) -> None:
    """List tappable modules with output shapes, and the encoder/decoder stages found automatically."""
    from medkd.models.inspection import format_tappable, inspect_model

    rows, stages = inspect_model(name, spatial_dims=dims, in_channels=in_channels, out_channels=out_channels,
                                 preset=preset, input_size=input_size)
    console.print(format_tappable(rows))
    for part, names in stages.items():
        console.print(f"[bold]{part}[/]: {', '.join(names)}")


@app.command("predict")
def predict_cmd(
    input: Annotated[Path, typer.Option("--input", "-i", help="folder of CASE_0000.ext images, or a dataset folder")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for CASE.ext segmentations")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="best.pt / last.pt of a run, or a teacher set (teachers.json "
                                                            "or its folder), which predicts as one model")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="instead of --checkpoint: a folder from `medkd export`, run with "
                                                        "onnxruntime on the CPU (no PyTorch needed)")] = None,
    split: Annotated[str, typer.Option(help="for a dataset folder: test (imagesTs) or train (imagesTr)")] = "test",
    tta: Annotated[bool, typer.Option(help="average over mirrored inputs")] = False,
    whole_slice: Annotated[Optional[bool], typer.Option(
        "--whole-slice/--no-whole-slice", help="2D models: predict whole slices, or slide a window of the "
        "training patch size (default: as the run validated, data.whole_slice_inference)")] = None,
    postprocess: Annotated[bool, typer.Option(help="single models: apply postprocessing.json beside the checkpoint "
                                                   "(keep the largest component where it raised validation Dice); "
                                                   "teacher sets never post-process")] = True,
    combine: Annotated[str, typer.Option(help="teacher sets: mean_prob (average member probabilities) or "
                                              "mean_logits (softmax of averaged member logits)")] = "mean_prob",
    uncertainty: Annotated[bool, typer.Option(help="teacher sets of 2+ members: also write CASE_uncertainty.ext "
                                                   "(.nii.gz for PNG inputs; float32; mean over classes of the "
                                                   "members' probability std)")] = False,
    save_probabilities: Annotated[bool, typer.Option(help="also write CASE.npz (float16 softmax; combined for a "
                                                          "teacher set)")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    overwrite: bool = False,
) -> None:
    """Segment images; outputs keep the input's format and exact geometry."""
    from tqdm import tqdm

    from medkd.workflows.predict import predict

    members, written = predict(checkpoint, input, output, bundle=bundle, split=split, tta=tta, whole_slice=whole_slice,
                               postprocess=postprocess, combine=combine, uncertainty=uncertainty,
                               save_probabilities=save_probabilities, device=device, overwrite=overwrite,
                               progress=lambda items: tqdm(items, desc="predict", unit="case"))
    what = f"segmentation(s) of {members} combined member(s)" if members > 1 else "segmentation(s)"
    console.print(f"wrote {len(written)} {what}{' and uncertainty maps' if uncertainty else ''} to {output}")


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="a run folder (its best.pt) or a checkpoint .pt")],
    output: Annotated[Path, typer.Option("--output", "-o", help="bundle folder to create")],
    force: Annotated[bool, typer.Option(help="replace a non-empty --output folder")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="int8: static int8 (QDQ) calibrated on a few training "
                                                    "cases of the run's dataset")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights and activations")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="dataset or image folder to calibrate on "
                                                        "(default: the run's data.dataset)")] = None,
) -> None:
    """Bundle a network for `medkd predict --bundle` (no PyTorch needed there): model.onnx, plan.json
    (preprocessing, post-processing, precision, checksums) and a model card README.md."""
    from medkd.deploy.quantize import check_precision
    from medkd.workflows.export import export_bundle, export_summary

    precision = check_precision(quantize, fp16)
    console.print(export_summary(export_bundle(source, output, force=force, precision=precision,
                                               calibration=calibration)))


@app.command("postprocess")
def postprocess_cmd(
    run_dir: Annotated[Path, typer.Option(help="a training run folder (config.yaml, best.pt) or a teacher set")],
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """(Re)decide the post-processing of a run on its validation cases; writes RUN_DIR/postprocessing.json.

    nnU-Net's rule: keep only the largest connected component (all foreground as one, then per class)
    where that raises the validation Dice. `medkd predict` applies it to this run's best.pt. For a teacher
    set (a folder with teachers.json) it is decided on the ensemble's combined predictions.
    """
    from medkd.workflows.postprocess import decide_and_report

    _setup_logging(False)
    console.print("\n".join(decide_and_report(run_dir, device=device)))


@app.command("evaluate")
def evaluate_cmd(
    pred_dir: Annotated[Path, typer.Argument(help="predicted segmentations")],
    label_dir: Annotated[Optional[Path], typer.Argument(help="reference labels (default: DATASET/labelsTs)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset folder: use its labelsTs and labels")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="dataset.json giving the class names")] = None,
    output: Annotated[Optional[Path], typer.Option(help="where to write per_case.csv, summary.csv/json")] = None,
    workers: int = 2,
) -> None:
    """Per-case, per-class Dice, HD95 and average surface distance (spacing-aware, MONAI metrics).

    PRED_DIR is what `medkd predict` wrote, for one checkpoint or a teacher set (uncertainty maps
    CASE_uncertainty.ext in it are skipped).
    """
    from medkd.workflows.evaluate import evaluate_predictions

    result, label_dir = evaluate_predictions(pred_dir, label_dir, dataset=dataset, labels=labels, workers=workers)
    paths = result.save(output or pred_dir / "evaluation")
    console.print(result.table(title=f"{pred_dir} vs {label_dir}"))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")


@app.command("models")
def models_cmd(
    dims: Annotated[int, typer.Option(help="spatial dims for the parameter count")] = 2,
) -> None:
    """List the registry's architectures with teacher/student parameter counts."""
    from medkd.workflows.catalog import models_table

    console.print(models_table(dims))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="parent folder of the demo run")] = Path("demo_runs"),
    teacher_steps: Annotated[int, typer.Option(help="optimiser steps of the teacher")] = 800,
    student_steps: Annotated[int, typer.Option(help="optimiser steps of each student (labels-only, each recipe)")] = 800,
) -> None:
    """Few labels, many images: phantoms -> teacher, student, distilled students -> held-out table and verdicts."""
    from medkd.workflows.demo import run_demo

    _setup_logging(False)
    run_demo(out, teacher_steps=teacher_steps, student_steps=student_steps, console=console)


from medkd.cli_nnunet import import_nnunet_command  # noqa: E402  (commands of their own modules)
from medkd.cli_plan import plan_command  # noqa: E402
from medkd.cli_study import experiment_command, report_command  # noqa: E402
app.command("experiment")(experiment_command)
app.command("report")(report_command)
app.command("plan")(plan_command)
app.command("import-nnunet")(import_nnunet_command)
guard_commands(app, err_console)  # every command: one line and an exit code on an expected error


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
