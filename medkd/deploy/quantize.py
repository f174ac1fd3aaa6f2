"""Lower-precision copies of a bundle's fp32 ``model.onnx``: int8 (static, QDQ) and fp16 (no PyTorch).

* **int8** - onnxruntime's static quantization in QDQ format: weights int8 (per output channel where
  the operator allows it, else per tensor), activations uint8 with ranges calibrated (MinMax) on
  real network inputs: :func:`calibration_inputs` preprocesses a few images with the bundle's plan
  and records exactly the batches the predictor feeds the network (whole slices or sliding windows).
  Input and output stay float32, so the predictor runs it unchanged.
* **fp16** - weights and activations in float16 by onnxruntime's own converter
  (``onnxruntime.transformers.float16``, the maintained copy of onnxconverter-common's, which is
  not a dependency); input and output stay float32.

:func:`compare_to_fp32` measures how far a converted model's labels and logits move from the fp32
model's on the calibration inputs; the bundle plan records it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from medkd.data.io import Geometry
from medkd.deploy import ops
from medkd.deploy.bundle import PRECISIONS

__all__ = ["PRECISIONS", "calibration_inputs", "check_precision", "compare_to_fp32", "convert_fp16",
           "quantize_int8"]


def check_precision(quantize: str | None, fp16: bool) -> str:
    """The bundle precision asked for by ``--quantize`` and ``--fp16``; ``ValueError`` for a bad combination."""
    if quantize is not None and fp16:
        raise ValueError(f"--quantize {quantize} and --fp16 exclude each other: a bundle holds one model, "
                         "either int8 or fp16; export twice for both")
    if quantize is not None and quantize != "int8":
        raise ValueError(f"--quantize {quantize!r}: only 'int8' is supported")
    return "int8" if quantize else "fp16" if fp16 else "fp32"


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # no warnings about unused initialisers
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def calibration_inputs(model: Path, plan: dict[str, Any], images: Sequence[tuple[np.ndarray, Geometry]],
                       max_samples: int = 32) -> list[np.ndarray]:
    """Network inputs (1, C, *spatial) float32 the bundle predictor feeds ``model`` for ``images``.

    Each image (C, *spatial, as read from disk) is preprocessed with ``plan["preprocessing"]`` and
    predicted as :class:`medkd.deploy.runtime.BundlePredictor` does (``plan["inference"]``: whole
    slices or the sliding window, no mirroring) by the fp32 ``model``; every batch it receives is
    recorded and split into single samples, of which a seeded uniform draw of ``max_samples`` is kept
    (reservoir sampling: memory stays bounded for large 3D volumes), in the order they were fed.
    The MinMax calibrator then keeps only per-tensor minima and maxima of each, not the activations.
    """
    session = _session(model)
    name = session.get_inputs()[0].name
    kept: dict[int, tuple[int, np.ndarray]] = {}
    seen, generator = [0], np.random.default_rng(0)

    def network(batch: np.ndarray) -> np.ndarray:
        for sample in batch:
            slot = seen[0] if seen[0] < max_samples else int(generator.integers(0, seen[0] + 1))
            if slot < max_samples:
                kept[slot] = (seen[0], np.array(sample[None]))
            seen[0] += 1
        return session.run(None, {name: batch})[0]

    pre, inference = plan["preprocessing"], plan["inference"]
    for image, geometry in images:
        prepared, _ = ops.preprocess(image, geometry, pre)
        ops.predict_probabilities(network, prepared, mode=pre["mode"], patch_size=inference["patch_size"],
                                  batch_size=int(inference.get("batch_size", 8)),
                                  overlap=float(inference.get("overlap", 0.5)),
                                  whole_slice=bool(inference.get("whole_slice")),
                                  divisor=int(plan["model"].get("largest_stride", 1)))
    if not kept:
        raise ValueError("no calibration input: give at least one image")
    return [sample for _, sample in sorted(kept.values(), key=lambda item: item[0])]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizer's per-tensor notes (e.g. PRelu slopes that cannot be per-channel) for a while."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32: Path, out: Path, samples: Sequence[np.ndarray], input_name: str = "image",
                  method: str = "MinMax") -> dict[str, Any]:
    """Write the static int8 QDQ model of ``fp32`` to ``out``, calibrated on ``samples``; return its record.

    ``method``: onnxruntime's calibration method (``MinMax``, ``Percentile``, ``Entropy``, ``Distribution``).
    MinMax is the default: on an ACDC student, Percentile, Entropy, 64 inputs instead of 32 and float
    first and last convolutions all moved the int8 Dice change within the spread of the calibration draw.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            sample = next(self.items, None)
            return None if sample is None else {input_name: sample}

    with tempfile.TemporaryDirectory(prefix="medkd_quant_") as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        # onnx shape inference and graph clean-up; symbolic shape inference cannot handle the dynamic axes
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[method])
    onnx.checker.check_model(str(out))
    return {"method": "onnxruntime static quantization", "format": "QDQ",
            "weights": "int8, per output channel where supported", "activations": "uint8",
            "calibration": method, "calibration_samples": len(samples),
            "onnxruntime": ort.__version__}


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (as ONNX requires).

    The float16 converter appends the Cast nodes of the kept float32 input and output at the end;
    onnxruntime tolerates that, ``onnx.checker`` does not.
    """
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(name in ready for name in n.input)]
        if not runnable:
            raise ValueError(f"graph has a cycle or an input nobody produces (node {pending[0].name!r})")
        for node in runnable:
            ready.update(node.output)
        ordered += runnable
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(fp32: Path, out: Path) -> dict[str, Any]:
    """Write the float16 model of ``fp32`` to ``out`` (float32 input and output kept); return its record."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    _sort_topologically(model.graph)
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "io": "float32",
            "onnxruntime": ort.__version__}


def compare_to_fp32(fp32: Path, other: Path, samples: Sequence[np.ndarray]) -> dict[str, float]:
    """Share of equal argmax labels and largest |logit difference| of ``other`` vs ``fp32`` on ``samples``."""
    reference, candidate = _session(fp32), _session(other)
    name = reference.get_inputs()[0].name
    same = total = 0
    worst = 0.0
    for sample in samples:
        a = reference.run(None, {name: sample})[0]
        b = candidate.run(None, {name: sample})[0].astype(np.float32)
        same += int((a.argmax(1) == b.argmax(1)).sum())
        total += a.shape[0] * int(np.prod(a.shape[2:]))
        worst = max(worst, float(np.abs(a - b).max()))
    return {"label_agreement": round(same / max(total, 1), 6), "max_abs_logit_diff": round(worst, 6)}
