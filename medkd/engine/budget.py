"""Budgets mean wall time: ``train.max_time_min`` bounds the whole command, not only the training loop.

The clock (:class:`PhaseClock`) of the ``medkd`` command starts with its process (``/proc/self/stat``),
so imports, planning, preprocessing, the teacher-output cache fill, training, validation, the final
validation and the post-processing decision all count. The loop stops early enough to leave time for
what follows it: :class:`TimeBudget` reserves the estimated time of the final validation and the
post-processing decision (each one sliding-window pass over the validation cases): the number of
windows (:func:`inference_windows`, MONAI's grid at overlap 0.5) times the measured time of one window,
corrected by the ratio of measured to estimated time of every validation the loop runs, plus two checkpoint
writes, one more step (the next one must fit) and the process's exit. A resumed run adds this session's wall time to the
``elapsed_s`` of its checkpoint. What comes before the loop cannot be cut short: a budget smaller than
start-up, preprocessing and the cache fill is overrun by what they take beyond it (the run trains one step,
and a warning says so, with a budget that would leave room to train).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from medkd.data.grid import window_starts

log = logging.getLogger(__name__)

SAFETY = 1.25  # the reserve covers 25% more than estimated before a validation has calibrated it
EXIT_S = 5.0  # after result.json: loader workers, TensorBoard and the interpreter shut down
CHECKPOINT_BYTES_PER_S = 100e6  # before a checkpoint was timed: weights + AdamW moments written at 100 MB/s
INFERENCE_BATCH = 8  # windows per forward in validation and prediction (medkd.engine.inference's batch_size)


def process_started() -> float:
    """``time.monotonic()`` at which this process started (Linux ``/proc``), else now."""
    try:
        with open("/proc/self/stat") as handle:
            start_ticks = float(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def runs_as_command() -> bool:
    """Whether this process is the ``medkd`` command (``medkd ...``, ``python -m medkd``, torchrun/srun of it),
    not a notebook or a test calling the workflows (whose process started long before the run)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.name == "medkd" or (program.name == "__main__.py" and program.parent.name == "medkd")


def command_started() -> float:
    """When the command started: the process's start for the ``medkd`` command, else now."""
    return process_started() if runs_as_command() else time.monotonic()


class PhaseClock:
    """Wall time since the command started, and of each named phase (seconds, summed over repeats).

    Without ``started`` the clock starts with the command (:func:`command_started`) and records the time
    until now as ``startup`` (interpreter and imports, for the ``medkd`` command).
    """

    def __init__(self, started: float | None = None):
        self.started = command_started() if started is None else started
        self.phases: dict[str, float] = {}
        self.last: dict[str, float] = {}  # each phase's latest duration
        if started is None:  # the process's start-up (interpreter, imports) until now
            self.add("startup", self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.last[name] = seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def report(self) -> dict[str, float]:
        """Each phase's seconds, ``other`` (start-up, imports, checkpoints...) and ``total``."""
        total = self.elapsed()
        out = {name: round(seconds, 2) for name, seconds in self.phases.items()}
        out["other"] = round(max(0.0, total - sum(self.phases.values())), 2)
        out["total"] = round(total, 2)
        return out


def sliding_windows(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over ``shape`` (padded to at least ``patch``)."""
    return math.prod(len(window_starts(max(size, roi), roi, overlap)) for size, roi in zip(shape, patch))


def inference_windows(shapes: Sequence[Sequence[int]], mode: str, patch: Sequence[int],
                      whole_slice: bool = False) -> float:
    """Patch-sized forward passes to predict cases of preprocessed ``shapes`` (z, y, x); 2D mode runs slices
    (whole ones count as their area over the patch's)."""
    total = 0.0
    for z, *plane in ([int(s) for s in shape] for shape in shapes):
        if mode == "3d":
            total += sliding_windows([z, *plane], patch)
        elif whole_slice:
            total += z * max(1.0, math.prod(plane) / math.prod(patch))
        else:
            total += z * sliding_windows(plane, patch)
    return total


@torch.inference_mode()
def seconds_per_window(network: nn.Module, in_channels: int, patch: Sequence[int], device: torch.device,
                       batch: int = INFERENCE_BATCH, repeats: int = 2) -> float:
    """Measured eval-mode seconds per window: the best of ``repeats`` forwards of ``batch`` patch-sized windows
    (validation runs windows in batches of :data:`INFERENCE_BATCH`), after a warm-up forward. One window at
    batch 1 overstated it up to 4x for a 2D teacher, and the loop then stopped a third of its budget early."""
    was_training = network.training
    network.eval()
    x = torch.zeros((batch, in_channels, *patch), device=device)
    network(x)
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        network(x)
        times.append(time.monotonic() - start)
    network.train(was_training)
    return min(times) / batch


class TimeBudget:
    """The loop's share of ``max_time_s``: it stops when the next step would run into the reserve.

    ``val_windows``: windows of one validation (the cases the loop validates on); ``final_windows``: of the
    final validation plus the post-processing decision; ``window_s``: measured seconds per window. The reserve
    also holds two checkpoint writes (their latest duration in ``clock``, else ``checkpoint_s``), the loop's
    mean step time and :data:`EXIT_S`.
    """

    def __init__(self, max_time_s: float, val_windows: float, final_windows: float, window_s: float,
                 clock: PhaseClock | None = None, checkpoint_s: float = 0.0):
        self.max_time_s, self.val_windows, self.final_windows = max_time_s, val_windows, final_windows
        self.window_s, self.calibration, self.clock, self.checkpoint_s = window_s, SAFETY, clock, checkpoint_s
        self.first: tuple[float, int] | None = None  # (elapsed, step) when the loop started
        self.step_s = 0.0

    @property
    def reserve_s(self) -> float:
        checkpoint_s = self.clock.last.get("checkpoints", self.checkpoint_s) if self.clock else self.checkpoint_s
        return self.final_windows * self.window_s * self.calibration + 2 * checkpoint_s + self.step_s + EXIT_S

    @property
    def loop_s(self) -> float:
        """Seconds of command wall time at which the loop must stop (at least 1% of the budget)."""
        return max(0.01 * self.max_time_s, self.max_time_s - self.reserve_s)

    def fraction(self, elapsed: float, step: int) -> float:
        """Share of the loop's time used at ``elapsed`` seconds and ``step``; tracks the mean step time."""
        if self.first is None:
            self.first = (elapsed, step)
            if elapsed >= self.loop_s:
                self._warn_spent(elapsed)
        elif step > self.first[1]:
            self.step_s = (elapsed - self.first[0]) / (step - self.first[1])
        return elapsed / self.loop_s

    def _warn_spent(self, elapsed: float) -> None:
        total = elapsed + self.reserve_s
        log.warning("the %.1f-minute budget was spent before training began (start-up, planning, preprocessing "
                    "and the cache fill took %.0f s; the final validation and exit need about %.0f s more): the run "
                    "trains one step and ends about %.0f s over it; give --max-time-min at least %.1f",
                    self.max_time_s / 60, elapsed, self.reserve_s, total - self.max_time_s, total / 60 * 1.5)

    def validated(self, seconds: float) -> None:
        """Calibrate the estimate with a measured validation (of ``val_windows`` windows)."""
        estimated = self.val_windows * self.window_s
        if estimated > 0 and seconds > 0:
            self.calibration = seconds / estimated


def time_budget(config, val_cases: Sequence, validated_cases: int, network: nn.Module, device: torch.device,
                in_channels: int, clock: PhaseClock | None = None) -> TimeBudget | None:
    """The :class:`TimeBudget` of a run config with ``train.max_time_min`` (None without): the loop validates the
    first ``validated_cases`` of ``val_cases``, the final phases predict them and then all of ``val_cases``."""
    if not config.train.max_time_min:
        return None
    data = config.data
    shapes = [case.properties["shape"] for case in val_cases]
    loop = inference_windows(shapes[:validated_cases], data.mode, data.patch_size, data.whole_slice_inference)
    final = loop + inference_windows(shapes, data.mode, data.patch_size, data.whole_slice_inference)
    window_s = seconds_per_window(network, in_channels, data.patch_size, device) if shapes else 0.0
    checkpoint_s = 16.0 * sum(p.numel() for p in network.parameters()) / CHECKPOINT_BYTES_PER_S
    return TimeBudget(config.train.max_time_min * 60.0, loop, final, window_s, clock, checkpoint_s)
