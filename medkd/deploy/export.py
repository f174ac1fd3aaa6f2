"""A checkpoint's deployable network as ONNX: rebuilt, exported, checked against PyTorch, timed.

Only the network in the checkpoint's ``state_dict`` is exported: the training-only modules in
``extra_state`` (distillation adapters, projection heads, auxiliary heads) are never loaded, and a
``dynunet`` trained with deep supervision is rebuilt without its extra heads (which eval-mode
inference never uses). The ONNX graph (TorchScript exporter, opset :data:`OPSET`) takes
``image`` (B, C, *spatial) float32 and returns ``logits`` (B, K, *spatial); batch and spatial axes
are dynamic (any sizes the network accepts, e.g. multiples of its largest stride).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from medkd.models import ModelSpec, create_from_spec

__all__ = ["OPSET", "ExportError", "deployable_network", "export_onnx", "onnx_latency", "verify_onnx"]

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(ValueError):
    """A network cannot be exported or its export disagrees with PyTorch; the message names the checkpoint."""


def deployable_network(state: dict[str, Any], source: Path) -> nn.Module:
    """The eval-mode network of checkpoint ``state`` (read from ``source``), without deep-supervision heads.

    The checkpoint's network is rebuilt and loaded strictly first; a deep-supervision ``dynunet`` is
    then rebuilt without its heads and given every weight it has (strictly again).
    """
    try:
        spec = ModelSpec.from_dict(state["model_spec"])
        model = create_from_spec(spec)
        model.load_state_dict(state["state_dict"])
        if spec.deep_supervision:
            spec.deep_supervision = False
            plain = create_from_spec(spec)
            keep = plain.state_dict().keys()
            plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep})
            model = plain
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ExportError(f"{source}: cannot rebuild its network ({type(err).__name__}: {err})") from None
    return model.eval()


def _dynamic_axes(spatial_dims: int) -> dict[str, dict[int, str]]:
    axes = {0: "batch", **{2 + i: f"spatial_{i}" for i in range(spatial_dims)}}
    return {INPUT_NAME: axes, OUTPUT_NAME: dict(axes)}


def export_onnx(model: nn.Module, path: Path, example_shape: Sequence[int], source: Path) -> None:
    """Write ``model`` as ONNX to ``path``, traced on zeros of ``example_shape`` (1, C, *patch).

    Raises :class:`ExportError` naming ``source`` when PyTorch cannot export it or the result fails
    ``onnx.checker``.
    """
    example = torch.zeros(tuple(example_shape))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation notes about the TorchScript exporter
            torch.onnx.export(model, (example,), str(path), opset_version=OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=_dynamic_axes(len(example_shape) - 2),
                              do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(str(path))
    except Exception as err:  # the exporter raises many types (UnsupportedOperatorError, RuntimeError...)
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ExportError(f"{source}: cannot export {type(model).__name__} to ONNX "
                          f"({type(err).__name__}: {first_line})") from None


def verify_onnx(model: nn.Module, path: Path, shape: Sequence[int], source: Path, tolerance: float = 1e-4,
                seed: int = 0) -> float:
    """Largest |ONNX - PyTorch| logit on a random input of ``shape`` (B, C, *spatial).

    Give a ``shape`` other than the export example's (batch 2, another spatial size) to prove the
    dynamic axes. Raises :class:`ExportError` naming ``source`` when it exceeds ``tolerance`` times
    ``max(1, max |logit|)``.
    """
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(x).numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    except Exception as err:
        raise ExportError(f"{source}: onnxruntime cannot run the exported network on {tuple(shape)} "
                          f"({type(err).__name__}: {err})") from None
    if got.shape != reference.shape:
        raise ExportError(f"{source}: ONNX output {got.shape} differs from PyTorch's {reference.shape}")
    diff = float(np.abs(got - reference).max())
    if not diff <= tolerance * max(1.0, float(np.abs(reference).max())):
        raise ExportError(f"{source}: ONNX logits differ from PyTorch's by {diff:.3g} (tolerance {tolerance:g})")
    return diff


def onnx_latency(path: Path, shape: Sequence[int], threads: int = 1, repeats: int = 5,
                 precision: str = "fp32") -> dict[str, Any]:
    """Median and best ms of onnxruntime on zeros of ``shape`` with ``threads`` threads (one warm-up run).

    ``precision`` (of the model at ``path``) only names the engine in the record.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.zeros(tuple(shape), dtype=np.float32)
    session.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - start) * 1000)
    return {"input_shape": list(shape), "threads": threads, "repeats": repeats,
            "engine": f"onnxruntime {ort.__version__} {precision}",
            "median_ms": round(statistics.median(times), 3), "best_ms": round(min(times), 3)}
