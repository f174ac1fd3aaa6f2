"""Checks around SimpleITK's reader that it does not make itself, each in bounded memory.

* **Declared size against the file, before any voxel is read.** ITK allocates the voxel buffer the
  header declares: a 0.5 MB ``.nii.gz`` whose header claims 1200x1200x700 float32 makes it allocate
  7.8 GB. :func:`check_declared_size` compares the header's voxel bytes with the file's size: deflate
  (gzip ``.nii.gz``, PNG, compressed MetaImage/NRRD) expands at most ~1032x, so a file claiming more
  than :data:`MAX_EXPANSION` times its size is refused; an uncompressed ``.nii`` must hold all its
  voxel bytes. Any image above ``$MEDKD_MAX_IMAGE_GB`` (default 16 GiB) is refused too, whatever its
  file (this also covers MetaImage/NRRD headers whose data live in another file).
* **NIfTI truncation and NaN/Inf voxels.** ITK zero-fills truncated NIfTI data and reads NaN/Inf as
  0; :func:`scan_nifti` streams the (decompressed) file in blocks of :data:`SCAN_CHUNK` bytes, so it
  costs one block of memory instead of a second copy of the volume.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

MAX_EXPANSION = 2000  # declared voxel bytes per file byte; deflate's own maximum is ~1032
DEFAULT_MAX_IMAGE_GB = 16.0
SCAN_CHUNK = 1 << 24  # bytes per block when streaming NIfTI voxels


class ImageReadError(RuntimeError):
    """An image file could not be read; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def max_image_bytes() -> int:
    """The largest voxel buffer an image may declare: ``$MEDKD_MAX_IMAGE_GB`` GiB (default 16)."""
    text = os.environ.get("MEDKD_MAX_IMAGE_GB", str(DEFAULT_MAX_IMAGE_GB))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"MEDKD_MAX_IMAGE_GB must be a number of GiB, got {text!r}") from None
    return int(value * (1 << 30))


def declared_bytes(reader: sitk.ImageFileReader) -> int:
    """Voxel bytes the header of ``reader`` (after ``ReadImageInformation``) declares."""
    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", kind)
    per_component = (int(bits.group(1)) // 8 if bits else 8) * (2 if kind.startswith("complex") else 1)
    return math.prod(int(s) for s in reader.GetSize()) * reader.GetNumberOfComponents() * per_component


def _detached(path: Path, ending: str) -> bool:
    """MetaImage/NRRD headers may keep their voxels in another file (or use bzip2): no ratio applies."""
    if ending not in (".mha", ".nrrd"):
        return False
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("latin-1")
    meta = re.search(r"^ElementDataFile\s*=\s*(\S+)", head, re.MULTILINE)
    if meta is not None:
        return meta.group(1) != "LOCAL"
    return re.search(r"^(data ?file:|encoding:\s*(bz2|bzip2))", head, re.MULTILINE | re.IGNORECASE) is not None


def check_declared_size(path: Path, ending: str, reader: sitk.ImageFileReader) -> None:
    """Refuse, before reading voxels, an image whose header declares more data than is plausible."""
    declared, size = declared_bytes(reader), path.stat().st_size
    shape = "x".join(str(s) for s in reader.GetSize())
    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    what = f"the header declares {shape} {kind} voxels ({declared / (1 << 30):.2f} GiB)"
    limit = max_image_bytes()
    if declared > limit:
        raise ImageReadError(path, f"{what}, above the limit of {limit / (1 << 30):.2f} GiB "
                                   "(raise it with MEDKD_MAX_IMAGE_GB if the image is real)")
    if ending == ".nii" and declared > size:
        raise ImageReadError(path, f"file is truncated: {what} but the file has {size} bytes")
    if declared > MAX_EXPANSION * size and not _detached(path, ending):
        raise ImageReadError(path, f"{what} but the file has {size} bytes ({declared // max(size, 1)}x; "
                                   f"compression gives at most ~1000x): the header is wrong or the file is truncated")


@dataclass(frozen=True)
class NiftiLayout:
    endian: str
    datatype: int
    bitpix: int
    dims: tuple[int, ...]  # (x, y[, z[, t ...]]) as stored, Fortran order
    offset: int

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.dims))

    @property
    def data_bytes(self) -> int:
        return self.num_voxels * self.bitpix // 8


def nifti_layout(header: bytes) -> NiftiLayout | None:
    """Parse the data layout from a NIfTI-1/2 header, or None when it cannot be parsed."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 348)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 540)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return NiftiLayout(endian, datatype, bitpix, tuple(max(int(d), 1) for d in dims[1 : dims[0] + 1]), offset)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype code -> numpy dtype


def _read_exactly(handle: BinaryIO, count: int) -> bytes:
    parts, left = [], count
    while left > 0 and (block := handle.read(min(left, SCAN_CHUNK))):
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _scan_voxels(handle: BinaryIO, layout: NiftiLayout, dtype: np.dtype | None) -> tuple[int, list, list]:
    """Stream the voxel bytes: how many are present, and the flat index and value of each non-finite one."""
    step = SCAN_CHUNK - SCAN_CHUNK % (dtype.itemsize if dtype is not None else 1)
    present, indices, values = 0, [], []
    while present < layout.data_bytes:
        block = handle.read(min(step, layout.data_bytes - present))
        if not block:
            break
        if dtype is not None and len(block) % dtype.itemsize == 0:
            raw = np.frombuffer(block, dtype=dtype)
            bad = np.flatnonzero(~np.isfinite(raw))
            if bad.size:
                indices.append(bad + present // dtype.itemsize)
                values.append(raw[bad])
        present += len(block)
    return present, indices, values


def scan_nifti(path: Path, ending: str, array: np.ndarray) -> np.ndarray:
    """``array`` as ITK read it, with truncation detected and NaN/Inf voxels restored from the file."""
    opener = gzip.open if ending == ".nii.gz" else open
    try:
        with opener(path, "rb") as handle:
            header = _read_exactly(handle, 540)
            layout = nifti_layout(header)
            if layout is None:
                return array
            head = header[layout.offset:] if layout.offset < len(header) else b""
            if layout.offset > len(header):
                _read_exactly(handle, layout.offset - len(header))
            floats = layout.datatype in _NIFTI_FLOATS and layout.num_voxels == array.size
            dtype = np.dtype(layout.endian + _NIFTI_FLOATS[layout.datatype]) if floats else None
            present, indices, values = _scan_voxels(_Prefixed(head, handle), layout, dtype)
    except (EOFError, OSError, zlib.error) as exc:
        raise ImageReadError(path, f"file is truncated or not valid gzip ({exc})") from None
    if present < layout.data_bytes:
        raise ImageReadError(path, f"file is truncated: {layout.offset + present} of "
                                   f"{layout.offset + layout.data_bytes} bytes present")
    if not indices:
        return array
    out = np.ascontiguousarray(array, dtype=np.result_type(array.dtype, np.float32))
    out.reshape(-1)[np.concatenate(indices)] = np.concatenate(values)  # raw order == numpy C order
    return out


class _Prefixed:
    """A binary reader that first returns ``prefix``, then reads from ``handle``."""

    def __init__(self, prefix: bytes, handle: BinaryIO) -> None:
        self.prefix, self.handle = prefix, handle

    def read(self, count: int) -> bytes:
        if self.prefix:
            block, self.prefix = self.prefix[:count], self.prefix[count:]
            return block + (self.handle.read(count - len(block)) if count > len(block) else b"")
        return self.handle.read(count)
