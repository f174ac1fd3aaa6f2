"""Image reading and writing for the file formats nnU-Net v2 raw datasets use.

Array convention: numpy arrays are in SimpleITK/numpy order, i.e. ``(z, y, x)`` for 3D and
``(y, x)`` for 2D images; multi-channel files (4D NIfTI as used by MSD, or vector images) are
returned channel-first as ``(c, z, y, x)``. Geometry tuples (spacing, origin) are in SimpleITK
order ``(x, y[, z])``; ``direction`` is the flattened row-major direction cosine matrix as
returned by ``SimpleITK.Image.GetDirection()``.

PNG files carry no origin/direction (ITK stores the spacing only), so a 2D geometry written to
``.png`` comes back with origin 0 and identity direction.

Before any voxel is read, the header's declared size is compared with the file
(:mod:`medkd.data.io_checks`), so a small file claiming a huge volume is refused instead of allocated.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medkd.data.io_checks import ImageReadError, check_declared_size, scan_nifti

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Geometry:
    """Physical placement of an image grid, in SimpleITK order ``(x, y[, z])``.

    ``direction`` is the flattened row-major ``ndim x ndim`` direction matrix.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.spacing)
        if len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError(
                f"inconsistent Geometry: spacing has {n} entries, origin {len(self.origin)}, "
                f"direction {len(self.direction)} (expected {n * n})"
            )
        for name in ("spacing", "origin", "direction"):  # "+ 0.0" turns -0.0 into 0.0
            object.__setattr__(self, name, tuple(float(v) + 0.0 for v in getattr(self, name)))

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.spacing)

    @classmethod
    def default(cls, ndim: int) -> Geometry:
        """Unit spacing, zero origin, identity direction."""
        return cls((1.0,) * ndim, (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))

    def matches(self, other: Geometry, atol: float = 1e-3) -> bool:
        """True when both have the same dimensionality and all fields are allclose (absolute tol)."""
        return not self.differences(other, atol)

    def differences(self, other: Geometry, atol: float = 1e-3) -> list[str]:
        """Names of the fields that differ (``"ndim"``, ``"spacing"``, ``"origin"``, ``"direction"``)."""
        if self.ndim != other.ndim:
            return ["ndim"]
        return [
            name
            for name in ("spacing", "origin", "direction")
            if not np.allclose(getattr(self, name), getattr(other, name), rtol=0.0, atol=atol)
        ]

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-serialisable form: ``{"spacing": [...], "origin": [...], "direction": [...]}``."""
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`; raises ``KeyError`` naming a missing key."""
        for key in ("spacing", "origin", "direction"):
            if key not in d:
                raise KeyError(f"geometry dict is missing the key {key!r}")
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    @classmethod
    def from_sitk(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """Geometry of a SimpleITK image (or of a reader after ``ReadImageInformation``)."""
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> None:
        """Set spacing/origin/direction on a SimpleITK image of the same dimensionality."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


def file_ending(path: PathLike) -> str:
    """Supported ending of ``path`` (e.g. ``".nii.gz"``); ``ValueError`` for anything else."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    raise ValueError(f"unsupported file ending for {path}; supported: {', '.join(SUPPORTED_ENDINGS)}")


#: Case-id suffix of the uncertainty map that ``medkd predict --uncertainty`` writes beside ``CASE<ending>``.
UNCERTAINTY_SUFFIX = "_uncertainty"


#: endings whose files carry no physical spacing (their unit is the pixel)
PIXEL_ENDINGS = (".png",)


def has_physical_spacing(ending: str) -> bool:
    """Whether images of this ending (``".png"``, ``".nii.gz"``...) carry a physical spacing in mm; PNGs do not."""
    return ending.lower() not in PIXEL_ENDINGS


def uncertainty_file(segmentation: PathLike) -> Path:
    """Where the uncertainty map of a segmentation file goes: ``CASE.ext`` -> ``CASE_uncertainty.ext``.

    PNG holds integers only, so the float map of a ``.png`` segmentation is written as ``.nii.gz``.
    """
    path = Path(segmentation)
    ending = file_ending(path)
    return path.with_name(path.name[: -len(ending)] + UNCERTAINTY_SUFFIX + (".nii.gz" if ending == ".png" else ending))


def _spatial_geometry(geometry: Geometry, ndim: int) -> Geometry:
    """Drop trailing (time/channel) axes of a higher-dimensional geometry, keeping ``ndim`` axes."""
    if geometry.ndim == ndim:
        return geometry
    full = np.asarray(geometry.direction).reshape(geometry.ndim, geometry.ndim)
    return Geometry(geometry.spacing[:ndim], geometry.origin[:ndim], tuple(full[:ndim, :ndim].ravel().tolist()))


def _check_readable(path: Path) -> str:
    try:
        ending = file_ending(path)
    except ValueError as exc:
        raise ImageReadError(path, str(exc)) from None
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    return ending


def _check_components(path: Path, ending: str, components: int) -> None:
    if ending == ".png" and components > 1:
        raise ImageReadError(path, f"only grayscale PNG is supported, file has {components} components (RGB/RGBA)")


def _itk_reason(exc: BaseException) -> str:
    """Condense a SimpleITK exception to its ITK error text (without source-file locations)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    text = " ".join(lines) or type(exc).__name__
    return re.sub(r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", text)


def _read_information(path: Path) -> sitk.ImageFileReader:
    """A reader of ``path`` after ``ReadImageInformation`` (header only, no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(path, f"header is unreadable ({_itk_reason(exc)})") from None
    return reader


def read_image(path: PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image into a numpy array in numpy order plus its spatial geometry.

    Returns ``(z, y, x)`` for 3D, ``(y, x)`` for 2D and ``(c, z, y, x)`` (with the 3D geometry)
    for 4D NIfTI or multi-component images. Any failure raises :class:`ImageReadError`.
    """
    path = Path(path)
    ending = _check_readable(path)
    reader = _read_information(path)
    check_declared_size(path, ending, reader)  # before ITK allocates what the header declares
    try:
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image)
    except (RuntimeError, MemoryError, ValueError) as exc:
        raise ImageReadError(path, f"file is unreadable or truncated ({_itk_reason(exc)})") from None
    components = image.GetNumberOfComponentsPerPixel()
    _check_components(path, ending, components)
    geometry = Geometry.from_sitk(image)
    if image.GetDimension() not in (2, 3, 4) or (components > 1 and image.GetDimension() == 4):
        raise ImageReadError(path, f"unsupported image dimension {image.GetDimension()} with {components} components")
    if components > 1:  # vector image: (*spatial, c) -> (c, *spatial)
        array = np.moveaxis(array, -1, 0)
    elif image.GetDimension() == 4:  # 4D NIfTI: (t, z, y, x) with t = channels
        geometry = _spatial_geometry(geometry, 3)
    del image  # the ITK buffer: only the numpy copy is kept while the file is scanned
    if ending in (".nii", ".nii.gz"):
        array = scan_nifti(path, ending, array)
    return np.ascontiguousarray(array), geometry


def read_header(path: PathLike) -> tuple[tuple[int, ...], Geometry]:
    """Shape (numpy order, channel-first for 4D/multi-component) and geometry without reading voxels."""
    path = Path(path)
    ending = _check_readable(path)
    reader = _read_information(path)
    components = reader.GetNumberOfComponents()
    _check_components(path, ending, components)
    shape = tuple(int(s) for s in reversed(reader.GetSize()))
    geometry = Geometry.from_sitk(reader)
    if components > 1:
        shape = (components, *shape)
    elif reader.GetDimension() == 4:
        geometry = _spatial_geometry(geometry, 3)
    return shape, geometry


def _png_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Validate and cast an array for PNG: 2D, integer valued, within uint8/uint16 range."""
    if array.ndim != 2:
        raise ValueError(f"PNG output {path} needs a 2D array, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise ValueError(f"PNG output {path} needs integer data, got dtype {array.dtype}")
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"PNG output {path} needs integer data, got non-integer {array.dtype} values")
    lo, hi = (array.min(), array.max()) if array.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise ValueError(f"PNG output {path}: values [{lo}, {hi}] are outside the uint8/uint16 range [0, 65535]")
    if hi <= 255 and array.dtype != np.uint16:
        return array.astype(np.uint8)
    return array.astype(np.uint16)


def _to_sitk(array: np.ndarray, geometry: Geometry, path: Path, ending: str) -> sitk.Image:
    if array.ndim == geometry.ndim:
        image = sitk.GetImageFromArray(array, isVector=False)
        geometry.apply_to(image)
        return image
    if array.ndim == geometry.ndim + 1 == 4 and ending in (".nii.gz", ".nii"):
        image = sitk.GetImageFromArray(array, isVector=False)  # (c, z, y, x) -> 4D NIfTI
        direction = np.eye(4)
        direction[:3, :3] = np.asarray(geometry.direction).reshape(3, 3)
        image.SetSpacing((*geometry.spacing, 1.0))
        image.SetOrigin((*geometry.origin, 0.0))
        image.SetDirection(tuple(direction.ravel().tolist()))
        return image
    raise ValueError(
        f"cannot write array of shape {array.shape} with a {geometry.ndim}D geometry to {path} "
        "(channel-first 4D output is only supported for NIfTI)"
    )


def write_image(array: np.ndarray, geometry: Geometry, path: PathLike) -> None:
    """Write ``array`` (numpy order) with ``geometry`` to ``path`` atomically.

    Parent folders are created. The image is first written to ``.tmp_<name>`` in the same folder
    (keeping the real ending so SimpleITK picks the format), then moved with ``os.replace``.
    ``(c, z, y, x)`` arrays with a 3D geometry are written as 4D NIfTI. PNG needs a 2D array with
    integer values in the uint8/uint16 range (cast to uint8 when they fit, else uint16).
    """
    path = Path(path)
    ending = file_ending(path)
    array = np.asarray(array)
    if ending == ".png":
        array = _png_array(array, path)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = _to_sitk(array, geometry, path, ending)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=ending == ".nii.gz")
        _check_written(tmp, image, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_written(tmp: Path, image: sitk.Image, path: Path) -> None:
    """Read ``tmp`` back: SimpleITK's writers ignore failed writes (a full disk leaves an empty or
    truncated file and no error), so a file that does not read back as ``image``'s size raises."""
    try:
        written = sitk.ReadImage(str(tmp))
        complete = written.GetSize() == image.GetSize()
    except RuntimeError:
        complete = False
    if not complete:
        raise OSError(f"{path}: the image writer left an incomplete file (disk full?)")

