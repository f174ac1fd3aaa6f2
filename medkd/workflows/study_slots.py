"""``medkd experiment --devices SPEC``: the slots a study's runs are spread over, and one run in a slot.

``SPEC`` is a comma-separated list of slots, each running one run at a time in its own process:

* ``cuda:<i>``: GPU ``i``; the run's config gets ``train.accelerator: cuda`` and ``train.devices: [i]``,
  so Fabric places it there (the test cases are then predicted on the CPU, as every study does);
* ``cpu:<c>`` or ``cpu:<a>-<b>``: CPU core ``c`` or cores ``a..b``; the slot's process is pinned to
  them (``os.sched_setaffinity``) and the run's config gets ``train.accelerator: cpu`` and
  ``train.num_threads`` = the slot's number of cores.

A slot may be listed twice (``cpu:0,cpu:0``: two runs share core 0). All slots are of one kind (a run's
numbers should not depend on which slot it drew), cores must be ones this process may run on
(``os.sched_getaffinity``) and GPUs ones torch sees; anything else is a :class:`ConfigError` raised
before any training. Where a run runs (``train.accelerator``, ``devices``, ``num_threads``:
:data:`PLACEMENT_KEYS`) is not part of what a study compares when it restarts, so a run stopped in one
slot resumes in whichever slot is free.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from medkd.config import ConfigError

PLACEMENT_KEYS = ("accelerator", "devices", "num_threads")
#: exit code of a slot process whose run stopped on SIGTERM/SIGINT (its last.pt written when it had started)
INTERRUPTED_EXIT = 3
_SLOT = re.compile(r"^(cpu):(\d+)(?:-(\d+))?$|^(cuda):(\d+)$")


@dataclass(frozen=True)
class Slot:
    """One place a run can go: a GPU index or a set of CPU cores."""

    name: str  # as written in SPEC, e.g. "cuda:1" or "cpu:0-1"
    kind: str  # "cpu" or "cuda"
    cores: tuple[int, ...] = ()  # CPU slots: the cores the process is pinned to
    gpu: int | None = None  # CUDA slots: the device index

    def train_keys(self) -> dict[str, Any]:
        """The run config's ``train`` keys that place a run in this slot."""
        if self.kind == "cuda":
            return {"accelerator": "cuda", "devices": [self.gpu]}
        return {"accelerator": "cpu", "devices": 1, "num_threads": len(self.cores)}


def _parse_one(text: str, spec: str) -> Slot:
    match = _SLOT.match(text.strip())
    if not match:
        raise ConfigError(f"--devices {spec!r}: slot {text!r} is not cuda:<i>, cpu:<core> or cpu:<first>-<last>")
    if match.group(4):
        return Slot(text.strip(), "cuda", gpu=int(match.group(5)))
    first, last = int(match.group(2)), int(match.group(3) or match.group(2))
    if last < first:
        raise ConfigError(f"--devices {spec!r}: slot {text!r}: the last core comes before the first")
    return Slot(text.strip(), "cpu", cores=tuple(range(first, last + 1)))


def _check_available(slots: list[Slot], spec: str) -> None:
    """Every core is one this process may use and every GPU one torch sees; ConfigError otherwise."""
    if slots[0].kind == "cpu":
        allowed = sorted(os.sched_getaffinity(0))
        for slot in slots:
            missing = sorted(set(slot.cores) - set(allowed))
            if missing:
                raise ConfigError(f"--devices {spec!r}: slot {slot.name}: core(s) {missing} are not available; this "
                                  f"process may run on core(s) {allowed} of {os.cpu_count()}")
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for slot in slots:
        if slot.gpu >= count:
            raise ConfigError(f"--devices {spec!r}: slot {slot.name}: no such GPU; torch sees {count} CUDA device(s)")


def parse_devices(spec: str) -> list[Slot]:
    """The slots of ``SPEC`` (see the module doc), checked against this machine.

    Raises :class:`ConfigError` naming ``--devices`` and the slot for a malformed, mixed or unavailable SPEC.
    """
    parts = spec.split(",")
    if not spec.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"--devices {spec!r}: give comma-separated slots such as cuda:0,cuda:1 or cpu:0,cpu:1")
    slots = [_parse_one(p, spec) for p in parts]
    kinds = sorted({s.kind for s in slots})
    if len(kinds) > 1:
        raise ConfigError(f"--devices {spec!r}: mixes {' and '.join(kinds)} slots; use one kind, so that every run "
                          "of the study trains on the same kind of device")
    _check_available(slots, spec)
    return slots


def placed(tree: dict[str, Any], slot: Slot | None) -> dict[str, Any]:
    """A copy of run config ``tree`` placed in ``slot`` (``tree`` itself when ``slot`` is None)."""
    if slot is None:
        return tree
    return {**tree, "train": {**tree["train"], **slot.train_keys()}}


def _redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (Python's and the C library's) to ``log_path`` (appended)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def run_in_slot(run: Any, study: Any, slot: Slot, log_path: str) -> None:
    """Entry point of a slot's process (spawned): train ``run`` (or resume it) in ``slot``, then evaluate it.

    The process leaves the terminal's process group (a Ctrl-C reaches only the scheduler, which stops the
    slots with SIGTERM), writes its output to ``log_path`` and exits with 0 (trained and evaluated),
    :data:`INTERRUPTED_EXIT` (stopped by a signal, its last.pt kept) or 1 (failed; the traceback is in the log).
    """
    os.setpgrp()
    _redirect_output(log_path)
    print(f"== {run.run_id} in slot {slot.name} (pid {os.getpid()})", flush=True)
    if slot.kind == "cpu":
        os.sched_setaffinity(0, slot.cores)
    from medkd.engine.preemption import TrainingInterrupted
    from medkd.workflows.experiment import train_planned
    from medkd.workflows.study_results import evaluate_run

    try:
        import torch

        if slot.kind == "cuda":
            torch.cuda.set_device(slot.gpu)
        else:  # also for an evaluation alone (the trainer sets train.num_threads)
            torch.set_num_threads(len(slot.cores))
        train_planned(run, slot=slot)
        evaluate_run(run, study)
    except TrainingInterrupted as err:
        print(f"== stopped: {err}", flush=True)
        sys.exit(INTERRUPTED_EXIT)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
