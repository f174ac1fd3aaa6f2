"""Atomic file writes, file checksums for the caches, and safe checkpoint loading.

A medkd checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(..., weights_only=True)``: no pickled code is ever executed. Keys:

``format``        "medkd-checkpoint-v1"
``model_spec``    :class:`medkd.models.ModelSpec` as a dict (rebuilds the network)
``state_dict``    weights of the deployable network only
``extra_state``   weights of training-only modules (distillation adapters, projection heads)
``optimizer``     optimiser state (absent in exported/best-only checkpoints is fine)
``step``, ``elapsed_s``, ``best_metric``, ``best_step``
``preprocessing`` the preprocessing plan (normalisation, spacing, crop, mode, patch size)
``labels``        {class name: value}
``config``        the fully resolved run config (``data.whole_slice_inference``: how 2D inference runs)
``torch_rng``     CPU RNG state, so a resumed run continues the same random stream
``mirror_axes``   optional: the spatial axes mirroring TTA may flip (an imported nnU-Net model's
                  ``inference_allowed_mirroring_axes``); absent: all
``nnunet``        optional, imported nnU-Net models only: where the weights came from (results folder,
                  configuration, fold, trainer, checkpoint SHA-256)

``postprocessing.json`` beside ``best.pt`` (:mod:`medkd.engine.postprocess`) records the
post-processing decided for that checkpoint (its file name and ``step``).

Every write goes to a temporary ``.tmp_<name>.<8 random characters>`` beside its target and is renamed
over it, so a reader never sees half a file. A process killed between the two leaves that temporary
file behind; :func:`remove_temp_files` removes them (the trainer does so when a run starts or
resumes). A failed write raises :class:`OSError` naming the target file, its temporary file removed.

PyTorch is imported only by the two checkpoint functions: the atomic writers and checksums also
serve the torch-free bundle predictor (:mod:`medkd.deploy.runtime`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

CHECKPOINT_FORMAT = "medkd-checkpoint-v1"
TEMP_PREFIX = ".tmp_"
#: ``tempfile.mkstemp(prefix=".tmp_<name>.")`` names: the prefix, then 8 characters of [a-z0-9_]
_TEMP_NAME = re.compile(r"^\.tmp_.+\.[a-z0-9_]{8}$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a medkd checkpoint; the message names the file."""


def _temp_path_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(name)


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is named like one of this module's temporary files (``.tmp_<name>.<8 chars>``)."""
    return bool(_TEMP_NAME.match(Path(path).name))


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left directly in ``folder``; return them.

    Only names of :func:`is_temp_file`'s pattern are touched; the caller must own ``folder`` (no other
    process may be writing there, or its write in progress would be removed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in sorted(folder.iterdir()) if is_temp_file(p) and p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as an OSError that names ``path`` (a write through a file object names no file)."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, open for writing; fsynced and renamed over ``path`` when the block
    ends without error. A failed write raises :class:`OSError` naming ``path``; the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path_beside(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        named = _naming(err, path)
        if named is err:
            raise
        raise named from err
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_file(Path(path)) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_numpy(path: str | Path, save: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """``save(file, *args, **kwargs)`` (``np.save``, ``np.savez``, ``np.savez_compressed``), atomically."""
    buffer = io.BytesIO()
    save(buffer, *args, **kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def crc32_of_file(path: str | Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes, read in ``chunk``-sized blocks (bounded memory)."""
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            value = zlib.crc32(block, value)
    return value


def file_record(path: str | Path) -> dict[str, int]:
    """``{"bytes": size, "crc32": checksum}`` of a file, as the caches store it in their sidecars."""
    return {"bytes": Path(path).stat().st_size, "crc32": crc32_of_file(path)}


def file_problem(path: str | Path, record: dict[str, Any] | None, *, check_crc: bool = True) -> str | None:
    """Why ``path`` does not match its :func:`file_record` (``None`` when it does).

    Missing file and size are checked first (one ``stat``); the CRC, which reads the whole file, only
    with ``check_crc``. Shared by the preprocessing and teacher-output caches.
    """
    path = Path(path)
    if record is None or not path.is_file():
        return f"{path.name} missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{path.name} has {size} bytes, expected {record.get('bytes')} (truncated?)"
    if check_crc and crc32_of_file(path) != record.get("crc32"):
        return f"{path.name} fails its CRC-32 check (corrupted)"
    return None


class _RecordingWriter(io.RawIOBase):
    """A write-only stream over ``handle`` that keeps the OSError of a failed write.

    ``torch.save`` turns a failed write (a full disk) into ``RuntimeError: [enforce fail at
    inline_container.cc...]`` that names neither file nor cause; the recorded error has both.
    """

    def __init__(self, handle: BinaryIO):
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise


@contextlib.contextmanager
def exclusive_lock(path: str | Path, on_wait: Callable[[], Any] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block; another process
    holding it makes this one wait (``on_wait()`` is called once first, e.g. to say so). The kernel drops the
    lock when its holder ends, however it ends. Where ``fcntl`` does not exist (Windows), no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the project's platforms
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous checkpoint intact. A failed write (full disk,
    read-only folder) raises :class:`OSError` naming ``path``; the temporary file is removed.
    """
    import torch  # lazily: the rest of this module serves torch-free code too

    path = Path(path)
    with _atomic_file(path) as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, writer)
        except RuntimeError as err:
            if writer.error is None:  # not a failed write
                raise
            raise _naming(writer.error, path) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a medkd checkpoint on the CPU with ``weights_only=True``."""
    import torch  # lazily, as in save_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code, not a torch file...
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a medkd checkpoint (missing format={CHECKPOINT_FORMAT!r})")
    return state


def _numpy_data_globals() -> list[Any]:
    """numpy's scalar and dtype constructors: they rebuild numbers from bytes and run no other code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "?")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def load_weights_only(path: str | Path) -> Any:
    """A foreign checkpoint (e.g. nnU-Net's ``checkpoint_final.pth``) loaded on the CPU with ``weights_only=True``.

    Tensors, containers, numbers, strings, ``torch.device`` and numpy scalars (nnU-Net logs
    ``np.float64`` values) are allowed; anything that needs other pickled code raises
    :class:`CheckpointError` naming the file and the globals it asks for. No pickled code runs.
    """
    import torch  # lazily, as in save_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle with code, not a torch file...
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in {f"{t.__module__}.{t.__qualname__}" for t in _numpy_data_globals()}]
        except Exception:  # noqa: BLE001 - not even a readable torch file
            unsafe = []
        if unsafe:
            raise CheckpointError(f"{path}: refused to load with weights_only=True: it needs pickled code "
                                  f"({', '.join(unsafe)}), which medkd never runs; re-save its weights as plain "
                                  "tensors") from None
        raise CheckpointError(f"cannot load checkpoint {path}: {str(err).splitlines()[0]}") from None

