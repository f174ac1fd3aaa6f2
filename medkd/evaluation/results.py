"""Aggregation of per-case metrics: :class:`EvaluationResult` (summary, files, table)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from medkd.evaluation.metrics import MEAN_FOREGROUND, METRIC_NAMES
from medkd.evaluation.report import comparison_table, write_csv, write_json

__all__ = ["EvaluationResult"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """NaN-aware mean and population standard deviation (``ddof=0``); NaN when nothing is left."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std())


def _format_mean_std(mean: float, std: float, spec: str) -> str:
    """``"mean ± std"`` with ``spec``, ``"-"`` for a missing mean."""
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


@dataclass
class EvaluationResult:
    """Per-case, per-class metrics of one evaluation run.

    Attributes:
        per_case: one row per case and foreground class with keys ``"case"``,
            ``"class"`` (the class name), ``"label"`` (its value), ``"dice"``,
            ``"hd95"``, ``"asd"``, ``"ref_voxels"`` and ``"pred_voxels"``.
            Distances are NaN where exactly one of the masks is empty.
        class_names: names of the scored classes in report order (defaults to
            their order of appearance in ``per_case``).
        distance_unit: ``"mm"`` where the images carry a physical spacing, ``"px"`` (pixels or
            voxels) where they do not (PNG); stored in every row and summary entry, shown in the table.
    """

    per_case: list[dict]
    class_names: list[str] = field(default_factory=list)
    distance_unit: str = "mm"

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = list(dict.fromkeys(row["class"] for row in self.per_case))
        if MEAN_FOREGROUND in self.class_names:
            raise ValueError(f"{MEAN_FOREGROUND!r} is reserved and cannot be a class name")
        if self.distance_unit not in ("mm", "px"):
            raise ValueError(f"distance_unit must be 'mm' or 'px', got {self.distance_unit!r}")
        for row in self.per_case:
            row.setdefault("distance_unit", self.distance_unit)

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Mean and standard deviation of each metric per class, plus their mean over classes.

        Returns:
            ``{class_name: {"dice_mean", "dice_std", "hd95_mean", "hd95_std",
            "asd_mean", "asd_std", "n_cases", "n_missing", "distance_unit"}, ...,
            "mean_foreground": {"dice_mean", "hd95_mean", "asd_mean", "n_missing", "distance_unit"}}``.
            Means and standard deviations (population, ``ddof=0``) skip NaN values;
            ``n_missing`` counts the cases whose distances are NaN (one mask empty).
            ``mean_foreground`` averages the per-class means (NaN means skipped).
        """
        out: dict[str, dict[str, float | int]] = {}
        for name in self.class_names:
            rows = [row for row in self.per_case if row["class"] == name]
            entry: dict[str, float | int] = {}
            for metric in METRIC_NAMES:
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([float(r[metric]) for r in rows])
            entry["n_cases"] = len(rows)
            entry["n_missing"] = sum(1 for r in rows if math.isnan(float(r["hd95"])))
            entry["distance_unit"] = self.distance_unit
            out[name] = entry
        overall: dict[str, float | int] = {
            f"{metric}_mean": _mean_std([float(out[name][f"{metric}_mean"]) for name in self.class_names])[0]
            for metric in METRIC_NAMES
        }
        overall["n_missing"] = sum(int(out[name]["n_missing"]) for name in self.class_names)
        overall["distance_unit"] = self.distance_unit
        out[MEAN_FOREGROUND] = overall
        return out

    def summary_rows(self) -> list[dict[str, Any]]:
        """The summary as flat rows (one per class, then ``mean_foreground``) for CSV and tables."""
        return [{"class": name, **values} for name, values in self.summary().items()]

    def save(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``per_case.csv``, ``summary.csv`` and ``summary.json`` into ``out_dir``.

        Each file is written atomically. NaN is written as ``nan`` in the CSV files
        and as ``null`` in the JSON file.

        Returns:
            ``{"per_case_csv": path, "summary_csv": path, "summary_json": path}``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_case_fields = ["case", "class", "label", *METRIC_NAMES, "ref_voxels", "pred_voxels", "distance_unit"]
        summary_fields = ["class"] + [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")]
        summary_fields += ["n_cases", "n_missing", "distance_unit"]
        return {
            "per_case_csv": write_csv(self.per_case, out / "per_case.csv", fieldnames=per_case_fields),
            "summary_csv": write_csv(self.summary_rows(), out / "summary.csv", fieldnames=summary_fields),
            "summary_json": write_json(self.summary(), out / "summary.json"),
        }

    def table(self, title: str | None = None) -> Table:
        """A rich table with one row per class (and the foreground mean): Dice, HD95, ASD as mean ± std."""
        rows = []
        for row in self.summary_rows():
            rows.append(
                {
                    "class": row["class"],
                    "dice": _format_mean_std(row["dice_mean"], row.get("dice_std", math.nan), ".3f"),
                    "hd95": _format_mean_std(row["hd95_mean"], row.get("hd95_std", math.nan), ".2f"),
                    "asd": _format_mean_std(row["asd_mean"], row.get("asd_std", math.nan), ".2f"),
                    "n_missing": row["n_missing"],
                }
            )
        columns = [
            ("class", "Class", ""),
            ("dice", "Dice", ""),
            ("hd95", f"HD95 ({self.distance_unit})", ""),
            ("asd", f"ASD ({self.distance_unit})", ""),
            ("n_missing", "Missing dist.", ",d"),
        ]
        return comparison_table(rows, columns, title or "Segmentation metrics")
