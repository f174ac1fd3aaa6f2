"""``medkd export``: a run's network as a self-contained bundle that runs without PyTorch.

The bundle (:mod:`medkd.deploy.bundle`) holds ``model.onnx``, ``plan.json`` (exactly the
preprocessing plan, patch size, inference choice, labels and post-processing that ``medkd predict
--checkpoint`` uses for the checkpoint, plus SHA-256 checksums) and a model card ``README.md``.
It is built in a temporary folder beside the output and renamed into place, so a failed export
leaves nothing behind and a forced one replaces the old bundle only once the new one is complete.

``precision="int8"`` or ``"fp16"`` (``--quantize int8``, ``--fp16``) ship a converted copy of the fp32
network (:mod:`medkd.deploy.quantize`) instead, after the fp32 one passed the PyTorch parity check;
int8 is calibrated on :data:`CALIBRATION_CASES` training cases of the run's dataset (its config's
``data.dataset`` and fold), preprocessed and windowed exactly as the predictor does.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import medkd
from medkd.data.dataset import load_dataset, read_case
from medkd.data.io import Geometry
from medkd.data.splits import get_split
from medkd.deploy import quantize
from medkd.deploy.bundle import BUNDLE_FORMAT, CARD_FILE, MODEL_FILE, PLAN_FILE, PRECISIONS, seal_plan
from medkd.deploy.card import card_facts, model_card
from medkd.deploy.export import (INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, deployable_network, export_onnx,
                                 onnx_latency, verify_onnx)
from medkd.engine.case_io import check_image, group_channel_files
from medkd.engine.case_io import read_case as read_image_files
from medkd.engine.inference import checkpoint_whole_slice
from medkd.engine.postprocess import postprocessing_beside, read_postprocessing
from medkd.models import count_macs, count_parameters, largest_stride
from medkd.storage import atomic_write_text, load_checkpoint

__all__ = ["CALIBRATION_CASES", "ExportResult", "calibration_images", "export_bundle", "export_summary",
           "resolve_checkpoint"]

#: training cases whose preprocessed windows calibrate an int8 model, and the most windows used
CALIBRATION_CASES, CALIBRATION_SAMPLES = 4, 32


@dataclass
class ExportResult:
    """Where the bundle went and what it measured."""

    bundle: Path
    checkpoint: Path
    plan: dict[str, Any]


def resolve_checkpoint(source: Path) -> Path:
    """``source`` itself for a file, else the run folder's ``best.pt``."""
    source = Path(source)
    if source.is_dir():
        if not (source / "best.pt").is_file():
            raise FileNotFoundError(f"{source}: no best.pt in this run folder; pass a checkpoint file instead")
        return source / "best.pt"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run folder or checkpoint")
    return source


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output}: exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise FileExistsError(f"{output}: folder is not empty; pass --force to replace it or choose another --output")


def _postprocessing(checkpoint: Path, state: dict[str, Any]) -> tuple[dict[str, list[int]] | None, dict | None]:
    """The steps ``medkd predict`` applies for this checkpoint (as in Predictor) and their decision record."""
    labels = state["labels"]
    steps = postprocessing_beside(checkpoint, state.get("step"), labels)
    if steps is None:
        return None, None
    record = read_postprocessing(checkpoint.parent / "postprocessing.json")
    return {"foreground": list(steps.foreground), "classes": list(steps.classes)}, record


def _evenly(items: list[str], count: int) -> list[str]:
    """``count`` of ``items`` spread evenly from first to last (all of them when there are no more)."""
    if len(items) <= count:
        return list(items)
    return sorted({items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)})


def calibration_images(checkpoint: Path, state: dict[str, Any], source: Path | None = None,
                       count: int = CALIBRATION_CASES) -> tuple[list[tuple[np.ndarray, Geometry]], dict[str, Any]]:
    """``count`` images (C, *spatial) to calibrate on, spread evenly over the sorted case ids, and their record.

    Without ``source``: training cases of the run's fold of its ``data.dataset`` (from the checkpoint's
    config; never validation or test cases). ``source`` may be another dataset folder (its training
    cases) or a folder of images with nnU-Net channel naming. Errors name the checkpoint or folder.
    """
    data = (state.get("config") or {}).get("data") or {}
    if source is None:
        if not data.get("dataset"):
            raise ValueError(f"{checkpoint}: its config has no data.dataset to calibrate on; "
                             "pass --calibration DATASET_OR_IMAGE_FOLDER")
        if not Path(data["dataset"]).is_dir():
            raise FileNotFoundError(f"{checkpoint}: config data.dataset {data['dataset']} is not a folder here; "
                                    "pass --calibration DATASET_OR_IMAGE_FOLDER")
    folder = Path(source if source is not None else data["dataset"])
    if (folder / "dataset.json").is_file():
        dataset = load_dataset(folder)
        ids = [c.case_id for c in dataset.training] if source is not None else get_split(
            dataset, fold=int(data.get("fold", 0)), num_folds=int(data.get("num_folds", 5)),
            group_regex=data.get("group_regex"))[0]
        ids = _evenly(sorted(ids), count)
        images = [(image, geometry) for image, _, geometry in (read_case(dataset.case(i), dataset) for i in ids)]
    elif folder.is_dir():
        groups = group_channel_files(folder, int(state["preprocessing"]["plan"]["num_channels"]))
        ids = _evenly(sorted(groups), count)
        images = [read_image_files(groups[i]) for i in ids]
    else:
        raise FileNotFoundError(f"{folder}: no such dataset or image folder to calibrate on")
    if not images:
        raise ValueError(f"{folder}: no cases to calibrate on")
    plan = state["preprocessing"]["plan"]
    for case_id, (image, _) in zip(ids, images):
        try:
            check_image(image, int(plan["num_channels"]), plan["mode"])
        except ValueError as err:
            raise ValueError(f"{folder}: calibration case {case_id}: {err}") from None
    return images, {"source": str(folder.resolve()), "cases": ids}


def _convert(fp32: Path, out: Path, precision: str, plan: dict[str, Any], checkpoint: Path,
             state: dict[str, Any], calibration: Path | None) -> dict[str, Any]:
    """Write the ``precision`` copy of ``fp32`` to ``out``; return its record (plan ``model.quantization``).

    int8 needs the calibration images; fp16 uses them only to compare with fp32, on 4 seeded random
    windows instead when the run's dataset is not here and no ``calibration`` was given.
    """
    try:
        images, cases = calibration_images(checkpoint, state, calibration)
        samples = quantize.calibration_inputs(fp32, plan, images, CALIBRATION_SAMPLES)
    except (OSError, ValueError):
        if precision == "int8" or calibration is not None:
            raise
        window = (1, int(plan["preprocessing"]["num_channels"]), *plan["inference"]["patch_size"])
        generator = np.random.default_rng(0)
        samples = [generator.standard_normal(window, dtype=np.float32) for _ in range(4)]
        cases = {"source": "random normal windows (no calibration images found)", "cases": []}
    try:
        if precision == "int8":
            record = quantize.quantize_int8(fp32, out, samples, INPUT_NAME)
        else:
            record = quantize.convert_fp16(fp32, out)
    except Exception as err:  # onnx, onnxruntime and the converters raise many types
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ExportError(f"{checkpoint}: cannot convert its network to {precision} "
                          f"({type(err).__name__}: {first_line})") from None
    record["calibration_cases"] = cases
    record["vs_fp32"] = {**quantize.compare_to_fp32(fp32, out, samples),
                         "inputs": f"the {len(samples)} network inputs of the calibration cases" if cases["cases"]
                         else f"{len(samples)} random normal windows"}
    return record


def _plan(checkpoint: Path, state: dict[str, Any], model: Any, window: tuple[int, ...], stride: int,
          diff: float, precision: str) -> dict[str, Any]:
    """The bundle plan of ``model`` (no latency, checksums or quantization record yet)."""
    steps, record = _postprocessing(checkpoint, state)
    return {
        "format": BUNDLE_FORMAT, "medkd_version": medkd.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint.resolve()), "step": state.get("step")},
        "model": {"file": MODEL_FILE, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
                  "precision": precision, "spec": model.medkd_spec.to_dict(), "parameters": count_parameters(model),
                  "macs_per_window": count_macs(model, window), "largest_stride": stride, "onnx_max_abs_diff": diff},
        "preprocessing": state["preprocessing"]["plan"],
        "inference": {"patch_size": list(window[2:]), "overlap": 0.5, "blend": "gaussian", "sigma_scale": 0.125,
                      "batch_size": 8, "whole_slice": checkpoint_whole_slice(state)},
        "labels": dict(state["labels"]),
        "postprocessing": steps, "postprocessing_record": record,
    }


def _build(checkpoint: Path, state: dict[str, Any], folder: Path, latency_repeats: int, precision: str = "fp32",
           calibration: Path | None = None) -> dict[str, Any]:
    """Write model.onnx (in ``precision``) and README.md into ``folder``; return the plan (not yet sealed).

    The fp32 export is checked against PyTorch first; an int8/fp16 model is then converted from it
    (the fp32 file stays in a scratch folder inside ``folder``, removed before the bundle is sealed).
    """
    model = deployable_network(state, checkpoint)
    spec = model.medkd_spec
    window = (1, spec.in_channels, *[int(p) for p in state["preprocessing"]["patch_size"]])
    scratch = folder / ".fp32"
    scratch.mkdir()
    fp32 = folder / MODEL_FILE if precision == "fp32" else scratch / MODEL_FILE
    export_onnx(model, fp32, window, checkpoint)
    stride = largest_stride(model, spec.spatial_dims, spec.in_channels)
    # batch 2 and a larger last axis: the dynamic axes work, not only the traced shape
    diff = verify_onnx(model, fp32, (2, *window[1:-1], window[-1] + stride), checkpoint)
    plan = _plan(checkpoint, state, model, window, stride, diff, precision)
    if precision != "fp32":
        plan["model"]["quantization"] = _convert(fp32, folder / MODEL_FILE, precision, plan, checkpoint, state,
                                                 calibration)
    shutil.rmtree(scratch)
    plan["latency"] = onnx_latency(folder / MODEL_FILE, window, repeats=latency_repeats, precision=precision)
    plan["latency"]["machine"] = f"{platform.machine()}, {os.cpu_count()} logical cores"
    atomic_write_text(folder / CARD_FILE, model_card(plan, card_facts(checkpoint, state)))
    return plan


def _share(folder: Path) -> None:
    """Give the bundle the usual permissions (temporary files are private: 0700 folder, 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _install(built: Path, output: Path) -> None:
    """Rename the finished bundle ``built`` to ``output`` (an existing one is replaced, then removed)."""
    _share(built)
    old = None
    if output.is_dir():
        old = output.with_name(f".old_{output.name}.{os.getpid()}")
        os.rename(output, old)
    try:
        os.rename(built, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(source: Path, output: Path, *, force: bool = False, latency_repeats: int = 5,
                  precision: str = "fp32", calibration: Path | None = None) -> ExportResult:
    """Export the network of ``source`` (a run folder's ``best.pt`` or a checkpoint) as a bundle in ``output``.

    ``precision``: ``"fp32"``, ``"int8"`` or ``"fp16"`` (:func:`medkd.deploy.quantize.check_precision`
    turns the command-line flags into it); ``calibration`` overrides where the calibration images come
    from (:func:`calibration_images`). A non-empty ``output`` is refused unless ``force``. Errors name
    the file (checkpoint, output, calibration folder); nothing is written when one is raised.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    checkpoint, output = resolve_checkpoint(source), Path(output)
    _check_output(output, force)
    state = load_checkpoint(checkpoint)
    if state["preprocessing"]["plan"].get("nnunet"):
        raise ValueError(f"{checkpoint}: preprocesses with an nnU-Net plan, which the torch-free bundle predictor "
                         "does not implement; predict with `medkd predict --checkpoint`")
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".tmp_{output.name}.", dir=output.parent))
    try:
        plan = seal_plan(_build(checkpoint, state, folder, latency_repeats, precision, calibration), folder)
        atomic_write_text(folder / PLAN_FILE, json.dumps(plan, indent=1))
        _check_output(output, force)  # again: another process may have written there meanwhile
        _install(folder, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ExportResult(bundle=output, checkpoint=checkpoint, plan=plan)


def export_summary(result: ExportResult) -> str:
    """One paragraph for the command line: what was written, parity with PyTorch (and fp32), size and speed."""
    model, latency = result.plan["model"], result.plan["latency"]
    converted = model.get("quantization")
    versus = "" if not converted else (
        f"; {model['precision']} vs fp32: {100 * converted['vs_fp32']['label_agreement']:.2f}% equal labels, max "
        f"|logit diff| {converted['vs_fp32']['max_abs_logit_diff']:.2g} on {converted['vs_fp32']['inputs']} "
        f"({', '.join(converted['calibration_cases']['cases']) or 'no calibration images found'})")
    return (f"exported {result.checkpoint} to {result.bundle}: {', '.join(sorted(result.plan['files']))} and "
            f"{PLAN_FILE}; {model['spec']['name']} ({model['parameters']:,} parameters, "
            f"{model['macs_per_window'] / 1e9:.3f} GMACs per window); fp32 ONNX vs PyTorch max |logit diff| "
            f"{model['onnx_max_abs_diff']:.1e}{versus}; {latency['median_ms']:.1f} ms per window "
            f"({latency['engine']}, {latency['threads']} thread)")
