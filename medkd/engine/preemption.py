"""Stopping a run on SIGTERM / SIGINT with a checkpoint, instead of losing the steps since the last one.

A cluster pre-empts a job with SIGTERM (SLURM, Kubernetes) and kills it a grace period later; Ctrl-C
sends SIGINT. While the training loop runs, :class:`StopSignals` only records the signal; the loop
finishes its step, writes ``last.pt`` and raises :class:`TrainingInterrupted`, which the command line
turns into exit code 128 + signal number (143 for SIGTERM, 130 for SIGINT). ``--resume`` continues
from that checkpoint. Before the loop (data preparation) and on a second signal the run stops at
once. Data-loader worker processes ignore both signals, so that a signal sent to the whole process
group (Ctrl-C, SLURM) does not kill them under the main process before it has saved.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """The run stopped on a signal; ``checkpoint`` is the ``last.pt`` written for it (None if none).

    A :class:`BaseException`, as :class:`KeyboardInterrupt` is: a signal outside the training loop raises it
    wherever the process is, also inside code that turns any ``Exception`` into its own error (loading a
    checkpoint does), which would make a stopped run look like a failed one.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is None:
            text = f"stopped by {name} before the first checkpoint; nothing to resume"
        else:
            saved = f"{checkpoint} written at step {step}" if step is not None else f"{checkpoint} kept"
            text = f"stopped by {name}; {saved}: continue with --run-dir {checkpoint.parent} --resume"
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopSignals:
    """Within ``with``: SIGTERM/SIGINT set :attr:`signum` while :attr:`deferred`, else raise at once.

    Handlers are installed only in the main thread (Python's rule); elsewhere this does nothing. The
    previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again = self.signum is not None
        self.signum = signum
        if again or not self.deferred:
            raise TrainingInterrupted(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class IgnoreStopSignals:
    """A data-loader ``worker_init_fn``: ignore SIGTERM/SIGINT, then run ``inner`` (picklable)."""

    def __init__(self, inner: Callable[[int], None] | None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
