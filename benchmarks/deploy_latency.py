"""Deploy latency: teacher and UNet student ladder, PyTorch vs onnxruntime fp32 / int8 / fp16, against the CPU floor.

For the 2D UNet teacher (shrink 0) and students (``--shrink`` 2..6; random weights, which do not change
the time) the table gives parameters, MACs, and for each engine and thread count: ms per 256x224 slice
(batch 1), ms per 10x256x224 volume (its slices in batches of 8, as ``medkd predict`` runs a 2D model),
the peak memory of the measurement, and the fraction of this machine's compute floor reached. The
floor of a model is 2 x MACs / peak, where the peak is the fp32 matmul GFLOP/s measured in the same run
(PyTorch ``mm`` of n x n float32 at the same thread count, best of a few): "% floor" = floor / measured.
The floor is an fp32 one for every engine: int8 (VNNI) can do more multiply-adds per cycle and pass 100%.
Below the table, per student: its fastest deployed engine against the teacher (issue 11: <= 1/8).
With ``--dims 3`` the same ladder of 3D UNets: ms per 32x64x64 patch (batch 1) and per 64x128x128 volume
(its 27 sliding windows of overlap 0.5 in batches of 2: the network's time, without the blending).

Peak memory: the process's peak resident set (Linux ``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs`` before each measurement, freed heap returned by ``malloc_trim`` between
them) minus the resident set before it: what building the session (weights, onnxruntime's
arena) and running the slice and the volume added. For PyTorch the weights were already resident.
``tracemalloc`` would see only Python allocations, not PyTorch's or onnxruntime's, so it is not used.

int8 models here are calibrated on random inputs (they only serve timing); the bundle's int8 model
(``medkd export --quantize int8``) is calibrated on real training cases, and its Dice change is
measured by ``benchmarks/deploy_parity.py --quantize int8``.

The student's whole pipeline (``--pipeline``, on by default) runs a bundle of the student preset
(shrink 3, 128x128 sliding window as the ACDC runs, or ``--run``'s checkpoint) on one 10x256x224
NIfTI volume (or ``--case``) and splits the time into read, preprocess, network (onnxruntime),
windows (gathering, Gaussian blending, softmax in numpy), restore (back to the input grid),
segment (argmax, post-processing) and write.

    taskset -c 0,1 python benchmarks/deploy_latency.py --threads 1 2
    python benchmarks/deploy_latency.py --quick     # seconds: the smoke test's run

Not a test (minutes in full).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import SimpleITK as sitk
import torch
from rich.console import Console
from rich.table import Table

from medkd.data.io import write_image
from medkd.data.preprocess import PreprocessingPlan
from medkd.deploy import ops
from medkd.deploy.export import export_onnx
from medkd.deploy.quantize import convert_fp16, quantize_int8
from medkd.deploy.runtime import BundlePredictor
from medkd.engine.case_io import read_case
from medkd.models import count_macs, count_parameters, create
from medkd.storage import save_checkpoint
from medkd.workflows.export import export_bundle

CLASSES = 4
Runner = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class Unit:
    """One network input and what makes a volume: a 2D model runs a volume's slices, a 3D model its sliding
    windows (overlap 0.5, as ``medkd predict``), ``batch`` inputs per call."""
    dims: int
    window: tuple[int, ...]
    calls: int
    batch: int
    label: str
    volume: str


UNITS = {2: Unit(2, (256, 224), 10, 8, "256x224 slice", "10-slice volume"),
         3: Unit(3, (32, 64, 64), 27, 2, "32x64x64 patch", "64x128x128 volume (27 windows of overlap 0.5)")}


# ------------------------------------------------------------------------------ machine and memory


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul GFLOP/s of PyTorch (``torch.mm`` of n x n) with ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak resident set added during a ``with`` block, in MB (Linux; ``None`` elsewhere)."""

    def __enter__(self) -> "PeakMemory":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.before = _status_kb("VmRSS")
        except (OSError, KeyError):
            self.before = None
        self.mb: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.before is not None:
            self.mb = (_status_kb("VmHWM") - self.before) / 1024


# ------------------------------------------------------------------------------ engines


def onnx_models(model: torch.nn.Module, folder: Path, precisions: list[str], unit: Unit) -> dict[str, Path]:
    """fp32 ONNX of ``model`` plus the int8 (calibrated on 4 random inputs) and fp16 copies asked for."""
    paths = {"fp32": folder / "fp32.onnx"}
    export_onnx(model, paths["fp32"], (1, 1, *unit.window), folder)
    if "int8" in precisions:
        generator = np.random.default_rng(0)
        samples = [generator.standard_normal((1, 1, *unit.window), dtype=np.float32) for _ in range(4)]
        paths["int8"] = folder / "int8.onnx"
        quantize_int8(paths["fp32"], paths["int8"], samples)
    if "fp16" in precisions:
        paths["fp16"] = folder / "fp16.onnx"
        convert_fp16(paths["fp32"], paths["fp16"])
    return paths


def pytorch_runner(model: torch.nn.Module, threads: int) -> Runner:
    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return run


def onnx_runner(path: Path, threads: int) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})


def time_engine(make: Callable[[], Runner], repeats: int, unit: Unit) -> dict[str, float | None]:
    """Median ms per input and per volume (its inputs in batches of ``unit.batch``) and peak MB (session
    included)."""
    generator = np.random.default_rng(1)
    one = generator.standard_normal((1, 1, *unit.window), dtype=np.float32)
    volume = generator.standard_normal((unit.calls, 1, *unit.window), dtype=np.float32)
    with PeakMemory() as memory:
        run = make()
        run(one)  # warm-up
        input_ms = statistics.median(_seconds(lambda: run(one)) for _ in range(repeats)) * 1000
        volume_ms = statistics.median(
            _seconds(lambda: [run(volume[i:i + unit.batch]) for i in range(0, unit.calls, unit.batch)])
            for _ in range(max(1, repeats // 2))) * 1000
    return {"ms_input": input_ms, "ms_volume": volume_ms, "peak_mb": memory.mb}


def bench_model(name: str, shrink: int, threads: list[int], precisions: list[str], peaks: dict[int, float],
                repeats: int, unit: Unit, student_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every engine at every thread count for one UNet (random weights; a student with ``student_kwargs``)."""
    torch.manual_seed(0)
    extra = student_kwargs if shrink else {}
    model = create("unet", unit.dims, 1, CLASSES, preset="teacher" if shrink == 0 else "student", shrink=shrink,
                   **extra).eval()
    macs = count_macs(model, (1, 1, *unit.window))
    rows = []
    with tempfile.TemporaryDirectory(prefix="medkd_latency_") as tmp:
        paths = onnx_models(model, Path(tmp), precisions, unit)
        engines: dict[str, Callable[[int], Runner]] = {"pytorch": lambda t: pytorch_runner(model, t)}
        engines.update({f"ort {p}": (lambda t, p=p: onnx_runner(paths[p], t)) for p in paths})
        for engine, factory in engines.items():
            for t in threads:
                timing = time_engine(lambda: factory(t), repeats, unit)
                floor_ms = 2 * macs / (peaks[t] * 1e9) * 1000
                rows.append({"model": name, "shrink": shrink, "params": count_parameters(model), "gmacs": macs / 1e9,
                             "engine": engine, "threads": t, **timing, "floor_ms": floor_ms,
                             "floor_fraction": floor_ms / timing["ms_input"]})
    return rows


# ------------------------------------------------------------------------------ the student's pipeline


def student_bundle(folder: Path, run: Path | None) -> Path:
    """A bundle of ``run`` (a run folder or checkpoint), or of a random-weight student with an ACDC-like plan."""
    if run is None:
        model = create("unet", 2, 1, CLASSES, preset="student")
        plan = PreprocessingPlan(mode="2d", normalization=["zscore"], ct_stats=[None], target_spacing=None,
                                 crop_nonzero=True, num_channels=1)
        run = folder / "student.pt"
        save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                         "preprocessing": {"plan": plan.to_dict(), "patch_size": [128, 128]},
                         "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}, "step": 0}, run)
    return export_bundle(run, folder / "bundle", latency_repeats=1).bundle


def synthetic_case(path: Path) -> Path:
    """A 10x256x224 int16 volume (smooth blobs on a dark field, 1.5625 x 1.5625 x 10 mm) like an ACDC frame."""
    generator = np.random.default_rng(2)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in (UNITS[2].calls, *UNITS[2].window)], indexing="ij")
    body = np.exp(-(y ** 2 + x ** 2) / 0.3) * 600 + np.exp(-((y - 0.1) ** 2 + x ** 2) / 0.02) * 400 * (1 - z ** 2)
    array = (body + generator.normal(0, 20, body.shape)).clip(0).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5625, 1.5625, 10.0))
    sitk.WriteImage(image, str(path))
    return path


def pipeline(bundle: Path, case: Path, out: Path, threads: int, repeats: int) -> dict[str, float]:
    """Median ms of each stage of predicting ``case`` with ``bundle``, read to write."""
    predictor = BundlePredictor(bundle, threads=threads)
    network, inner = [0.0], predictor.network

    def timed(batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        result = inner(batch)
        network[0] += time.perf_counter() - start
        return result

    predictor.network = timed
    stages: dict[str, list[float]] = {}
    for _ in range(repeats + 1):  # the first is a warm-up
        times, network[0] = {}, 0.0
        times["read"], (image, geometry) = _timed(lambda: read_case([case]))
        times["preprocess"], (prepared, props) = _timed(lambda: (predictor.check_image(image),
                                                                 predictor.prepare(image, geometry))[1])
        grid_s, grid = _timed(lambda: predictor.predict_grid(prepared))
        times["network"], times["windows"] = network[0], grid_s - network[0]
        times["restore"], probs = _timed(lambda: ops.restore(grid, props, image.shape[1:]))
        times["segment"], labels = _timed(lambda: predictor.segment(probs))
        times["write"], _ = _timed(lambda: write_image(labels, geometry, out / case.name))
        for stage, seconds in times.items():
            stages.setdefault(stage, []).append(seconds * 1000)
    return {stage: statistics.median(values[1:]) for stage, values in stages.items()}


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------ report


def latency_table(rows: list[dict[str, Any]], peaks: dict[int, float], unit: Unit) -> Table:
    peak_text = ", ".join(f"{t} thread(s) {g:.0f}" for t, g in peaks.items())
    table = Table(title=f"{unit.dims}D: ms per {unit.label} and per {unit.volume}; fp32 matmul peak "
                        f"GFLOP/s: {peak_text}")
    for column in ("model", "params", "GMACs/input", "engine", "thr", "ms/input", "ms/volume", "peak MB",
                   "floor ms", "% floor", "vs PyTorch", "vs ort fp32"):
        table.add_column(column, justify="left" if column in ("model", "engine") else "right")
    reference = {(r["model"], r["threads"]): r["ms_input"] for r in rows if r["engine"] == "pytorch"}
    onnx_fp32 = {(r["model"], r["threads"]): r["ms_input"] for r in rows if r["engine"] == "ort fp32"}
    for r in rows:
        memory = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        table.add_row(r["model"], f"{r['params']:,}", f"{r['gmacs']:.2f}", r["engine"], str(r["threads"]),
                      f"{r['ms_input']:.1f}", f"{r['ms_volume']:.0f}", memory, f"{r['floor_ms']:.2f}",
                      f"{100 * r['floor_fraction']:.1f}", f"{reference[r['model'], r['threads']] / r['ms_input']:.2f}x",
                      f"{onnx_fp32[r['model'], r['threads']] / r['ms_input']:.2f}x")
    return table


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 11's target per student and thread count: deployed latency at most 1/8 of the teacher's."""
    lines = []
    for t in sorted({r["threads"] for r in rows}):
        teacher = {r["engine"]: r["ms_input"] for r in rows if r["model"] == "teacher" and r["threads"] == t}
        if not teacher:
            continue
        best_teacher = min(ms for engine, ms in teacher.items() if engine != "pytorch")
        for student in dict.fromkeys(r["model"] for r in rows if r["model"] != "teacher"):
            deployed = [r for r in rows if r["model"] == student and r["threads"] == t and r["engine"] != "pytorch"]
            best = min(deployed, key=lambda r: r["ms_input"])
            lines.append(f"{t} thread(s), {student}: deployed ({best['engine']}) {best['ms_input']:.1f} ms/input = "
                         f"1/{teacher['pytorch'] / best['ms_input']:.1f} of the PyTorch teacher, "
                         f"1/{best_teacher / best['ms_input']:.1f} of the best deployed teacher (target <= 1/8)")
    return lines


def pipeline_table(stages: dict[int, dict[str, float]], case: Path) -> Table:
    table = Table(title=f"student pipeline on {case.name}: median ms per stage")
    table.add_column("stage")
    for t in stages:
        table.add_column(f"{t} thread(s)", justify="right")
        table.add_column("share", justify="right")
    for stage in next(iter(stages.values())):
        cells = []
        for values in stages.values():
            cells += [f"{values[stage]:.1f}", f"{100 * values[stage] / sum(values.values()):.0f}%"]
        table.add_row(stage, *cells)
    table.add_row("total", *[c for values in stages.values() for c in (f"{sum(values.values()):.1f}", "100%")])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shrink", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="student widths (2**-t)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["int8", "fp16"], choices=["int8", "fp16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per input (half as many per volume)")
    parser.add_argument("--student-kwargs", type=json.loads, default={}, help="JSON of extra UNet arguments of "
                        "the students, e.g. '{\"act\": \"relu\", \"norm\": \"batch\"}' (the teacher keeps its own)")
    parser.add_argument("--dims", type=int, default=2, choices=[2, 3], help="2D UNets on slices, or 3D UNets on "
                        "patches (3D: no student pipeline, which is the 2D student's)")
    parser.add_argument("--no-teacher", action="store_true", help="leave the teacher out")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the student pipeline")
    parser.add_argument("--run", type=Path, help="pipeline: this run folder or checkpoint instead of a random student")
    parser.add_argument("--case", type=Path, help="pipeline: this image file instead of a synthetic volume")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="smoke test: one student (shrink 5), 1 thread, "
                        "1 repeat, small matmul, no teacher")
    args = parser.parse_args()
    if args.quick:
        args.shrink, args.threads, args.repeats, args.no_teacher = [5], [1], 1, True
    unit = UNITS[args.dims]
    logging.getLogger().setLevel(logging.ERROR)
    console = Console(width=200)
    peaks = {t: matmul_peak(t, n=512 if args.quick else 2048) for t in args.threads}
    ladder = ([] if args.no_teacher else [("teacher", 0)]) + [(f"shrink {t}", t) for t in args.shrink]
    rows = [row for name, shrink in ladder for row in bench_model(name, shrink, args.threads, args.precisions, peaks,
                                                                   args.repeats, unit, args.student_kwargs)]
    console.print(latency_table(rows, peaks, unit))
    for line in ratios(rows):
        console.print(line)
    report: dict[str, Any] = {"matmul_peak_gflops": peaks, "unit": unit.label, "volume": unit.volume, "rows": rows}
    if not args.no_pipeline and unit.dims == 2:
        with tempfile.TemporaryDirectory(prefix="medkd_pipeline_") as tmp:
            folder = Path(tmp)
            (folder / "out").mkdir()
            bundle = student_bundle(folder, args.run)
            case = args.case or synthetic_case(folder / "case_0000.nii.gz")
            stages = {t: pipeline(bundle, case, folder / "out", t, args.repeats) for t in args.threads}
        console.print(pipeline_table(stages, case))
        report["pipeline"] = {"case": str(case), "stages_ms": stages}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
