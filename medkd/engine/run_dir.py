"""Owning a run folder: an atomic claim, leftovers of failed runs, and logs trimmed on resume.

A run folder belongs to one process at a time. The claim is ``.medkd.lock`` in the folder, created
atomically (a locked temporary file hard-linked to that name, which fails if the name exists) and
held with ``flock`` for as long as the run trains. The kernel drops the lock when the process ends,
however it ends, so a claim nobody holds is stale, and the folder's state tells what it is:

* a checkpoint (``last.pt`` / ``best.pt``) or anything medkd did not write: a run, kept; a new run
  there is refused, ``resume`` continues it;
* only what a run writes before its first checkpoint (config, logs, TensorBoard events, the claim,
  temporary files): a run that stopped before its first checkpoint; a new run replaces it (with a
  warning) and ``resume`` says there is nothing to resume.

Two processes that start together into one folder: one claims it, the other fails with
:class:`RunDirError`, whatever the timing.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from medkd.storage import atomic_write_text, is_temp_file, remove_temp_files

log = logging.getLogger(__name__)

CLAIM_NAME = ".medkd.lock"
CHECKPOINTS = ("last.pt", "best.pt")
#: what a run writes before its first checkpoint; a folder of only these holds no run worth keeping
LEFTOVERS = frozenset({CLAIM_NAME, "config.yaml", "train_log.csv", "val_log.csv", "tensorboard"})


class RunDirError(FileExistsError):
    """A run folder would be overwritten, is in use, or a resume has nothing to resume from."""


def _is_leftover(name: str) -> bool:
    """Written by a run before its first checkpoint: LEFTOVERS, a claim being made, a temporary file."""
    return name in LEFTOVERS or name.startswith(f"{CLAIM_NAME}.") or is_temp_file(name)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse, before any work, a run that could not claim ``run_dir`` (nothing is written).

    Fresh runs need a folder that is absent, empty or holds only a failed run's leftovers;
    ``resume`` needs ``last.pt``.
    """
    if resume:
        if not (run_dir / "last.pt").is_file():
            hint = ""
            if run_dir.is_dir() and any(run_dir.iterdir()) and all(_is_leftover(p.name) for p in run_dir.iterdir()):
                hint = ("; the run stopped before its first checkpoint: start it again without --resume "
                        "(its leftovers are replaced)")
            raise RunDirError(f"cannot resume: {run_dir / 'last.pt'} does not exist{hint}")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} is a file, not a folder; choose another --run-dir")
    _check_writable(run_dir)
    kept = [p.name for p in run_dir.iterdir() if not _is_leftover(p.name)] if run_dir.is_dir() else []
    if kept:
        raise RunDirError(f"run folder {run_dir} already holds a run ({', '.join(sorted(kept)[:3])}); pass "
                          "--resume to continue it or choose another --run-dir")


def _check_writable(run_dir: Path) -> None:
    """PermissionError naming ``run_dir`` if it, or the folder it would be made in, is not writable."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_fs(existing) else errno.EACCES
        raise PermissionError(code, os.strerror(code), str(existing))


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class RunClaim:
    """This process's hold on a run folder (see the module doc); :meth:`release` lets it go."""

    def __init__(self, run_dir: Path, fd: int, created_dir: bool):
        self.run_dir, self.fd, self.created_dir = run_dir, fd, created_dir

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1

    def discard(self) -> list[str]:
        """Remove what a run wrote before its first checkpoint (and the folder, if the claim made it).

        For a run that failed before its first checkpoint, so that nothing blocks its retry.
        Returns the names removed. Only :data:`LEFTOVERS` and temporary files are touched.
        """
        removed = _remove_leftovers(self.run_dir)
        (self.run_dir / CLAIM_NAME).unlink(missing_ok=True)  # still locked: a waiting claimer retries
        self.release()
        if self.created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:  # someone put something there meanwhile: leave it
                pass
        return removed


def _remove_leftovers(run_dir: Path) -> list[str]:
    """Delete the :data:`LEFTOVERS` (but the claim) and temporary files in ``run_dir``; return their names."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        if _is_leftover(path.name) and path.name != CLAIM_NAME:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _holder(path: Path) -> str:
    """Who holds the claim at ``path``, as the claim file records it (for error messages)."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _create_locked(path: Path) -> int | None:
    """A new claim file at ``path``, already locked (link of a locked temp file); None if it exists."""
    tmp = path.with_name(f"{CLAIM_NAME}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(tmp, path)
        return fd
    except (FileExistsError, FileNotFoundError):  # claimed first by another (who may have removed tmp)
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _lock_claim(run_dir: Path) -> int:
    """A locked file descriptor of ``run_dir``'s claim file (created if absent); RunDirError if held."""
    path = run_dir / CLAIM_NAME
    while True:
        fd = _create_locked(path)
        if fd is not None:
            return fd
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # removed between the two calls: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"run folder {run_dir} is in use by {_holder(path)} (it holds {path}); "
                              "wait for that run or choose another --run-dir") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the claim we locked was removed and replaced meanwhile: try again


def claim_run_dir(run_dir: Path, resume: bool) -> RunClaim:
    """Claim ``run_dir`` for this process, atomically (see the module doc).

    A fresh run gets a folder that is new, empty or held only leftovers of a run that stopped
    before its first checkpoint (removed, with a warning); ``resume`` needs ``last.pt``. Leftover
    temporary files of interrupted writes are removed in both cases.

    Raises:
        RunDirError: another process holds the folder, it holds a run (fresh) or no ``last.pt`` (resume).
    """
    check_run_dir(run_dir, resume)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock_claim(run_dir)
    claim = RunClaim(run_dir, fd, created)
    try:
        check_run_dir(run_dir, resume)  # again, now that nobody else can change it
        if not resume:
            stale = _remove_leftovers(run_dir)
            if stale:
                log.warning("run folder %s held a run that stopped before its first checkpoint; removed %s",
                            run_dir, ", ".join(stale))
        for path in remove_temp_files(run_dir):
            log.warning("removed %s, left by an interrupted write", path)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except BaseException:
        claim.release()
        raise
    return claim


class CSVLog:
    """Append-only CSV (the header is fixed by the first row); survives resume."""

    def __init__(self, path: Path):
        self.path = path
        self.fields: list[str] | None = None
        if path.is_file():
            with open(path, newline="") as handle:
                self.fields = next(csv.reader(handle), None)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (and the header first); a failed write (full disk) leaves no torn row."""
        new = self.fields is None
        fields = list(row) if new else self.fields
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with open(self.path, "a", newline="") as handle:
                handle.write(text.getvalue())
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise
        self.fields = fields


def trim_log(path: Path, last_step: int) -> int:
    """Drop the rows of the CSV log ``path`` after ``last_step`` (and any torn row); return how many.

    A resumed run repeats the steps after its checkpoint; without this their rows would appear
    twice. The file is rewritten atomically.
    """
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    kept = [row for row in body if len(row) == len(header) and _step(row[0]) is not None
            and _step(row[0]) <= last_step]
    if len(kept) < len(body):
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *kept])
        atomic_write_text(path, buffer.getvalue())
    return len(body) - len(kept)


def _step(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
