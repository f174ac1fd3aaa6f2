"""Wall-clock latency of the whole prediction pipeline (preprocessing, network, mapping back) per case.

The network's forward alone is :func:`medkd.models.measure_latency`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from medkd.engine.inference import Predictor, read_case

__all__ = ["pipeline_latency_ms"]


def pipeline_latency_ms(predictor: Predictor, cases: Sequence[Sequence[Path]], per_slice: bool = False) -> float:
    """Median wall-clock ms of ``predictor.predict_arrays`` over ``cases`` (each a case's channel files).

    Reading the files is excluded. With ``per_slice``, each case's time is divided by its number of
    slices (the first spatial axis of a 3D image; a 2D image is one slice).
    """
    times = []
    for files in cases:
        image, geometry = read_case(files)
        start = time.perf_counter()
        predictor.predict_arrays(image, geometry)
        elapsed_ms = (time.perf_counter() - start) * 1000
        times.append(elapsed_ms / image.shape[1] if per_slice and image.ndim == 4 else elapsed_ms)
    return statistics.median(times)
