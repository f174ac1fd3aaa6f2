"""``medkd import-nnunet``: a trained nnU-Net v2 model as a medkd teacher set (registered in :mod:`medkd.cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()


def _folds(values: list[str]) -> list[int | str]:
    """``["0,1", "2"]`` -> ``[0, 1, 2]``; ``all`` stays a name (nnU-Net's fold trained on every case)."""
    folds: list[int | str] = []
    for part in (p.strip() for value in values for p in value.split(",")):
        if part == "all":
            folds.append(part)
        elif part.isdigit():
            folds.append(int(part))
        elif part:
            raise ValueError(f"--folds: {part!r} is not a fold number or 'all'")
    return folds


def import_nnunet_command(
    results_dir: Annotated[Path, typer.Argument(help="nnU-Net v2 results folder of one trainer/plans/configuration: "
                                                     "plans.json, dataset.json, fold_X/checkpoint_final.pth")],
    out: Annotated[Path, typer.Option("--out", "-o", help="teacher-set folder to write (teachers.json, members/)")],
    configuration: Annotated[str, typer.Option(help="configuration of plans.json: 2d, 3d_fullres, 3d_lowres...")],
    folds: Annotated[Optional[list[str]], typer.Option(help="folds to import, comma list or repeated: "
                                                            "--folds 0,1,2,3,4 or --folds 0 --folds 1 ('all' too)")] = None,
    checkpoint_name: Annotated[str, typer.Option(help="checkpoint file in each fold folder")] = "checkpoint_final.pth",
    force: Annotated[bool, typer.Option(help="replace a non-empty OUT")] = False,
    postprocessing: Annotated[Optional[Path], typer.Option(
        help="nnU-Net's postprocessing.pkl or .json to apply [default: RESULTS_DIR/crossval_results_folds_<folds>/"
             "postprocessing.pkl when present]")] = None,
    no_postprocessing: Annotated[bool, typer.Option("--no-postprocessing",
                                                    help="import no post-processing decision")] = False,
) -> None:
    """Import folds of a trained nnU-Net v2 model as a teacher set (one member per fold) for distill/predict.

    Weights are loaded with torch.load(weights_only=True): a checkpoint that needs pickled code is refused.
    Needs the optional extra medkd[nnunet] (dynamic-network-architectures).
    """
    from medkd.workflows.nnunet_import import import_nnunet

    teachers = import_nnunet(results_dir, configuration, _folds(folds or ["0,1,2,3,4"]), out, force=force,
                             checkpoint_name=checkpoint_name, postprocessing=postprocessing,
                             find_postprocessing=not no_postprocessing)
    for member in teachers.members:
        dice = "n/a" if member.val_dice is None else f"{member.val_dice:.4f}"
        console.print(f"  {member.name}: {member.info.get('trainer')}, validation Dice {dice}")
    console.print(f"imported {len(teachers)} fold(s) of {configuration}; manifest {teachers.source}")
    _say_postprocessing(Path(teachers.source).parent)


def _say_postprocessing(folder: Path) -> None:
    path = folder / "postprocessing.json"
    if not path.is_file():
        console.print("no nnU-Net post-processing imported (argmax only)")
        return
    record = json.loads(path.read_text())
    steps = (["all foreground as one"] if record["foreground_as_one"]["applied"] else []) + \
        [f"largest component of {name}" for name, c in record["classes"].items() if c["applied"]]
    console.print(f"post-processing from {record['source']['nnunet_postprocessing']}: {', '.join(steps) or 'none'}")
