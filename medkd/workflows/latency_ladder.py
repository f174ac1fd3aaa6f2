"""``medkd plan --latency-ms X``: the student ladder of a plan, measured on this machine.

For each configuration, the planned ``unet`` at widths / 2^t for t = 0..6 (t = 0 is the teacher's width)
is exported to ONNX (:mod:`medkd.deploy.export`) and timed with onnxruntime on one patch (batch 1, one
warm-up run, median of ``repeats``), or with PyTorch where the export fails or ``engine="torch"``. A case
costs that time x the sliding windows (overlap 0.5) over the configuration's median image, which is what
``medkd predict`` runs (2D: per slice). The widest rung whose case time is at most ``latency_ms`` is named.
Weights are random: time does not depend on their values.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from medkd.deploy.export import ExportError, export_onnx, onnx_latency
from medkd.engine.budget import inference_windows
from medkd.models import count_parameters, create
from medkd.models.complexity import measure_latency

SHRINKS = range(0, 7)


def _rung_ms(network, shape: tuple[int, ...], engine: str, threads: int, repeats: int, folder: Path) -> tuple[float, str]:
    """Median ms of one forward of ``shape`` and the engine that ran it."""
    if engine == "onnx":
        path = folder / "rung.onnx"
        try:
            export_onnx(network, path, shape, source=path)
            record = onnx_latency(path, shape, threads=threads, repeats=repeats)
            return float(record["median_ms"]), "onnx"
        except ExportError:
            pass
    record = measure_latency(network, shape, warmup=1, repeats=repeats, threads=threads)
    return float(record["median_ms"]), "torch"


def configuration_ladder(plans: Mapping[str, Any], name: str, latency_ms: float, *, threads: int = 1,
                         repeats: int = 3, engine: str = "onnx",
                         note: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The measured ladder of configuration ``name``: one row per shrink, and the widest rung within budget."""
    if not latency_ms > 0:
        raise ValueError(f"--latency-ms must be > 0, got {latency_ms}")
    plan = plans["configurations"][name]
    dims = 2 if plan["mode"] == "2d" else 3
    channels, strides = plan["teacher"]["channels"], plan["teacher"]["strides"]
    in_channels, num_classes = plans["fingerprint"]["num_channels"], plans["num_classes"]
    windows = inference_windows([[round(s) for s in plan["median_shape"]]], plan["mode"], plan["patch_size"])
    shape = (1, in_channels, *plan["patch_size"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="medkd_ladder_") as folder:
        for shrink in SHRINKS:
            preset = "teacher" if shrink == 0 else "student"  # what `--preset student --shrink t` trains
            network = create("unet", dims, in_channels, num_classes, preset=preset, shrink=shrink, channels=channels,
                             strides=strides).eval()
            if note is not None:
                note(f"{name}: timing shrink {shrink} ({count_parameters(network):,} parameters)")
            window_ms, used = _rung_ms(network, shape, engine, threads, repeats, Path(folder))
            rows.append({"shrink": shrink, "preset": preset, "parameters": count_parameters(network),
                         "ms_per_window": window_ms, "ms_per_case": window_ms * windows, "engine": used})
    fitting = [row for row in rows if row["ms_per_case"] <= latency_ms]
    widest = min(fitting, key=lambda row: row["shrink"]) if fitting else None
    return {"configuration": name, "latency_ms": latency_ms, "threads": threads, "windows_per_case": windows,
            "rungs": rows, "widest": widest}


def ladder_table(ladder: Mapping[str, Any]) -> Table:
    """One row per rung; the widest one meeting the budget is marked."""
    widest = ladder["widest"]["shrink"] if ladder["widest"] else None
    table = Table(title=f"student ladder, {ladder['configuration']}: {ladder['windows_per_case']:g} windows per median "
                        f"case, {ladder['threads']} thread(s), budget {ladder['latency_ms']:g} ms per case")
    for column in ("shrink", "widths", "parameters", "ms / window", "ms / case", "engine", ""):
        table.add_column(column, justify="right" if column not in ("engine", "") else "left")
    for row in ladder["rungs"]:
        mark = "<- widest within budget" if row["shrink"] == widest else (
            "" if row["ms_per_case"] <= ladder["latency_ms"] else "over budget")
        table.add_row(str(row["shrink"]), f"/ {2 ** row['shrink']}", f"{row['parameters']:,}",
                      f"{row['ms_per_window']:.2f}", f"{row['ms_per_case']:.1f}", row["engine"], mark)
    return table


def ladder_verdict(ladder: Mapping[str, Any]) -> str:
    """One line naming the widest student within the budget, or saying that none is."""
    name, budget = ladder["configuration"], ladder["latency_ms"]
    if ladder["widest"] is None:
        fastest = min(ladder["rungs"], key=lambda row: row["ms_per_case"])
        return (f"{name}: no rung meets {budget:g} ms per case on this machine (the narrowest, shrink "
                f"{fastest['shrink']}, takes {fastest['ms_per_case']:.1f} ms)")
    row = ladder["widest"]
    return (f"{name}: widest student within {budget:g} ms per case: unet shrink {row['shrink']} "
            f"({row['parameters']:,} parameters, {row['ms_per_case']:.1f} ms per case) -> "
            f"`--preset student --shrink {row['shrink']}`")
