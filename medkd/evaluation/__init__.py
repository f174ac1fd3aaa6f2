"""Evaluation of segmentations: per-case metrics (via MONAI), folder evaluation and reports."""

from medkd.evaluation.folder import evaluate_folder
from medkd.evaluation.metrics import MEAN_FOREGROUND, METRIC_NAMES, case_metrics
from medkd.evaluation.results import EvaluationResult
from medkd.evaluation.report import comparison_table, format_value, write_csv, write_json

__all__ = [
    "MEAN_FOREGROUND",
    "METRIC_NAMES",
    "EvaluationResult",
    "case_metrics",
    "comparison_table",
    "evaluate_folder",
    "format_value",
    "write_csv",
    "write_json",
]
