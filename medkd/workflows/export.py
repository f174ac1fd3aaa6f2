"""``medkd export``: a run's network as a self-contained bundle that runs without PyTorch.

The bundle (:mod:`medkd.deploy.bundle`) holds ``model.onnx``, ``plan.json`` (exactly the
preprocessing plan, patch size, inference choice, labels and post-processing that ``medkd predict
--checkpoint`` uses for the checkpoint, plus SHA-256 checksums) and a model card ``README.md``.
It is built in a temporary folder beside the output and renamed into place, so a failed export
leaves nothing behind and a forced one replaces the old bundle only once the new one is complete.
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

import medkd
from medkd.deploy.bundle import BUNDLE_FORMAT, CARD_FILE, MODEL_FILE, PLAN_FILE, seal_plan
from medkd.deploy.card import card_facts, model_card
from medkd.deploy.export import (INPUT_NAME, OPSET, OUTPUT_NAME, deployable_network, export_onnx, onnx_latency,
                                 verify_onnx)
from medkd.engine.inference import checkpoint_whole_slice
from medkd.engine.postprocess import postprocessing_beside, read_postprocessing
from medkd.models import count_macs, count_parameters, largest_stride
from medkd.storage import atomic_write_text, load_checkpoint

__all__ = ["ExportResult", "export_bundle", "export_summary", "resolve_checkpoint"]


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


def _build(checkpoint: Path, state: dict[str, Any], folder: Path, latency_repeats: int) -> dict[str, Any]:
    """Write model.onnx and README.md into ``folder``; return the plan (not yet sealed)."""
    model = deployable_network(state, checkpoint)
    spec = model.medkd_spec
    patch = [int(p) for p in state["preprocessing"]["patch_size"]]
    window = (1, spec.in_channels, *patch)
    export_onnx(model, folder / MODEL_FILE, window, checkpoint)
    stride = largest_stride(model, spec.spatial_dims, spec.in_channels)
    # batch 2 and a larger last axis: the dynamic axes work, not only the traced shape
    diff = verify_onnx(model, folder / MODEL_FILE, (2, spec.in_channels, *patch[:-1], patch[-1] + stride), checkpoint)
    latency = onnx_latency(folder / MODEL_FILE, window, repeats=latency_repeats)
    latency["machine"] = f"{platform.machine()}, {os.cpu_count()} logical cores"
    steps, record = _postprocessing(checkpoint, state)
    plan = {
        "format": BUNDLE_FORMAT, "medkd_version": medkd.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint.resolve()), "step": state.get("step")},
        "model": {"file": MODEL_FILE, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
                  "spec": spec.to_dict(), "parameters": count_parameters(model),
                  "macs_per_window": count_macs(model, window), "largest_stride": stride, "onnx_max_abs_diff": diff},
        "preprocessing": state["preprocessing"]["plan"],
        "inference": {"patch_size": patch, "overlap": 0.5, "blend": "gaussian", "sigma_scale": 0.125, "batch_size": 8,
                      "whole_slice": checkpoint_whole_slice(state)},
        "labels": dict(state["labels"]),
        "postprocessing": steps, "postprocessing_record": record,
        "latency": latency,
    }
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


def export_bundle(source: Path, output: Path, *, force: bool = False, latency_repeats: int = 5) -> ExportResult:
    """Export the network of ``source`` (a run folder's ``best.pt`` or a checkpoint) as a bundle in ``output``.

    A non-empty ``output`` is refused unless ``force``. Errors name the file (checkpoint, output);
    nothing is written when one is raised.
    """
    checkpoint, output = resolve_checkpoint(source), Path(output)
    _check_output(output, force)
    state = load_checkpoint(checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".tmp_{output.name}.", dir=output.parent))
    try:
        plan = seal_plan(_build(checkpoint, state, folder, latency_repeats), folder)
        atomic_write_text(folder / PLAN_FILE, json.dumps(plan, indent=1))
        _check_output(output, force)  # again: another process may have written there meanwhile
        _install(folder, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ExportResult(bundle=output, checkpoint=checkpoint, plan=plan)


def export_summary(result: ExportResult) -> str:
    """One paragraph for the command line: what was written, parity with PyTorch, size and speed."""
    model, latency = result.plan["model"], result.plan["latency"]
    return (f"exported {result.checkpoint} to {result.bundle}: {', '.join(sorted(result.plan['files']))} and "
            f"{PLAN_FILE}; {model['spec']['name']} ({model['parameters']:,} parameters, "
            f"{model['macs_per_window'] / 1e9:.3f} GMACs per window); ONNX vs PyTorch max |logit diff| "
            f"{model['onnx_max_abs_diff']:.1e}; {latency['median_ms']:.1f} ms per window ({latency['engine']}, "
            f"{latency['threads']} thread)")
