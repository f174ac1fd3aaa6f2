"""Synthetic multi-class, multi-site phantom datasets in nnU-Net v2 raw format.

Each case has 4 foreground classes: 1 ``organ`` (large rotated ellipse/ellipsoid), 2 ``core``
(nested inside the organ), 3 ``neighbour`` (touching the organ from outside) and 4 ``lesion``
(a small blob inside the organ, well below 1% of the foreground on average with the default
shapes). The image is per-class tissue intensity, slightly blurred (partial volume), times a
smooth multiplicative bias field, plus Gaussian noise, followed by a per-site contrast (gamma),
scale and shift. Sites are assigned round robin (``site1``, ``site2``, ...) and recorded in
``case_metadata.json``. Everything is seeded: the same arguments give identical arrays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medkd.data.io import Geometry, PathLike, write_image
from medkd.data.io import file_ending as _ending_of

LABELS = {"background": 0, "organ": 1, "core": 2, "neighbour": 3, "lesion": 4}
TISSUE = np.array([0.15, 0.45, 0.70, 0.30, 0.95])  # normalised intensity per class value
DEFAULT_SHAPE = {2: (96, 96), 3: (32, 64, 64)}  # numpy order
SPACING_XYZ = {2: (1.0, 1.0), 3: (1.0, 1.0, 2.5)}  # SimpleITK order; png stores no origin
ORIGIN_XYZ = {2: (0.0, 0.0), 3: (-31.5, -45.0, 12.5)}
OUTPUTS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json", "case_metadata.json")
MIN_SIZE = 16


def phantom_geometry(spatial_dims: int) -> Geometry:
    """Geometry used for all phantom cases of the given dimensionality."""
    return Geometry(SPACING_XYZ[spatial_dims], ORIGIN_XYZ[spatial_dims], tuple(np.eye(spatial_dims).ravel()))


def site_parameters(num_sites: int) -> list[dict[str, float]]:
    """Per-site ``gamma``, ``scale`` and ``shift`` applied as ``scale * x**gamma + shift``."""
    gammas = np.linspace(0.75, 1.35, num_sites)
    scales = np.linspace(1.25, 0.8, num_sites)
    shifts = np.linspace(0.0, 0.15, num_sites)
    return [{"gamma": float(g), "scale": float(s), "shift": float(t)} for g, s, t in zip(gammas, scales, shifts)]


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    if ndim == 2:
        t = rng.uniform(0, np.pi)
        return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _ellipsoid(points: list[np.ndarray], center: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Normalised radius ``sum((R^T (p - c) / a)^2)``; ``points`` is an open grid (one broadcastable
    coordinate array in mm per numpy axis), so the cost is a few full-size array operations."""
    diff = [p - c for p, c in zip(points, center)]
    total = np.zeros(np.broadcast_shapes(*(p.shape for p in points)))
    for i in range(len(points)):
        local = sum(rot[j, i] * diff[j] for j in range(len(points)))
        total += (local / axes[i]) ** 2
    return total


def _grid(shape: tuple[int, ...], spacing_np: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Centred physical coordinates (open grid, mm, numpy order) and the half extents per axis."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_np)]
    half = np.array([(n - 1) / 2 * s for n, s in zip(shape, spacing_np)])
    return np.meshgrid(*axes, indexing="ij", sparse=True), half


def _label_map(rng: np.random.Generator, points: list[np.ndarray], half: np.ndarray,
               spacing_np: np.ndarray) -> np.ndarray:
    """One random label map with classes 0..4 (a class may be missing for tiny shapes; caller retries)."""
    ndim = len(points)
    size = float(half.min())
    a = rng.uniform(0.35, 0.5, ndim) * size
    c = rng.uniform(-0.15, 0.15, ndim) * half
    rot = _random_rotation(rng, ndim)
    d_organ = _ellipsoid(points, c, a, rot)
    organ = d_organ <= 1.0
    core_center = c + rot @ (rng.uniform(-0.15, 0.15, ndim) * a)
    core = (_ellipsoid(points, core_center, a * rng.uniform(0.5, 0.65), rot) <= 1.0) & organ
    v = rng.normal(size=ndim)
    v /= np.linalg.norm(v)
    surface = v / np.sqrt(np.sum((v / a) ** 2))
    b = rng.uniform(0.45, 0.65) * a.mean()
    n_center = c + rot @ (surface + v * 0.5 * b)
    neighbour = (_ellipsoid(points, n_center, b * rng.uniform(0.8, 1.2, ndim), _random_rotation(rng, ndim)) <= 1.0)
    neighbour &= ~organ
    candidates = np.flatnonzero((d_organ <= 0.6) & ~core) if np.any((d_organ <= 0.6) & ~core) else np.flatnonzero(organ)
    label = np.zeros(organ.shape, dtype=np.uint8)
    label[organ], label[core], label[neighbour] = 1, 2, 3
    if candidates.size:
        index = np.unravel_index(candidates[rng.integers(candidates.size)], organ.shape)
        center = np.array([p.ravel()[i] for p, i in zip(points, index)])
        radius = rng.uniform(1.0, 1.8) * max(float(spacing_np.min()), size / 45.0)
        label[(_ellipsoid(points, center, np.full(ndim, radius), np.eye(ndim)) <= 1.0) & organ] = 4
    return label


def _image(rng: np.random.Generator, label: np.ndarray, points: list[np.ndarray], half: np.ndarray,
           spacing_np: np.ndarray, site: dict[str, float]) -> np.ndarray:
    """Normalised intensity image (float64, same shape as ``label``) for one site."""
    tissue = TISSUE * (1.0 + rng.normal(0.0, 0.03, TISSUE.size))
    image = gaussian_filter(tissue[label], sigma=0.6 * spacing_np.min() / spacing_np)
    u = [p / h for p, h in zip(points, half)]
    gradient, curvature = rng.normal(0.0, 0.12, label.ndim), rng.normal(0.0, 0.08)
    image *= np.exp(sum(g * v + curvature * v**2 for g, v in zip(gradient, u)))
    image += rng.normal(0.0, 0.03, label.shape)
    return site["scale"] * np.clip(image, 0.0, None) ** site["gamma"] + site["shift"]


def make_phantom_case(index: int, seed: int, shape: tuple[int, ...],
                      site: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` of case ``index``: normalised float64 image and uint8 label, numpy order.

    Depends only on ``(seed, index, shape, site)``; every class 0..4 is present.
    """
    ndim = len(shape)
    spacing_np = np.array(SPACING_XYZ[ndim][::-1])
    points, half = _grid(shape, spacing_np)
    rng = np.random.default_rng([seed, index])
    for _ in range(50):
        label = _label_map(rng, points, half, spacing_np)
        if np.all(np.bincount(label.ravel(), minlength=len(LABELS)) > 0):
            return _image(rng, label, points, half, spacing_np, site), label
    raise RuntimeError(f"could not place all {len(LABELS)} classes in a phantom of shape {shape}")


def _check_args(spatial_dims: int, shape: tuple[int, ...] | None, file_ending_: str | None,
                num_train: int, num_test: int, num_sites: int) -> tuple[tuple[int, ...], str]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    shape = tuple(int(s) for s in (shape or DEFAULT_SHAPE[spatial_dims]))
    if len(shape) != spatial_dims or min(shape) < MIN_SIZE:
        raise ValueError(f"shape must have {spatial_dims} entries >= {MIN_SIZE} (numpy order), got {shape}")
    ending = file_ending_ or (".png" if spatial_dims == 2 else ".nii.gz")
    if _ending_of(f"x{ending}") != ending or (ending == ".png" and spatial_dims != 2):
        raise ValueError(f"file_ending {ending!r} is not usable for {spatial_dims}D phantoms")
    if num_train < 1 or num_test < 0 or num_sites < 1:
        raise ValueError(f"need num_train >= 1, num_test >= 0, num_sites >= 1; "
                         f"got {num_train}, {num_test}, {num_sites}")
    return shape, ending


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace the phantom dataset")
        for name in OUTPUTS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def make_phantoms(out_dir: PathLike, *, spatial_dims: int = 3, num_train: int = 24, num_test: int = 8,
                  shape: tuple[int, ...] | None = None, num_sites: int = 3, seed: int = 0,
                  file_ending: str | None = None, overwrite: bool = False) -> Path:
    """Write a phantom dataset to ``out_dir`` and return it.

    ``shape`` is in numpy order (default ``(32, 64, 64)`` z,y,x for 3D with spacing (1, 1, 2.5) x,y,z,
    ``(96, 96)`` for 2D). 2D images are uint8 (default ending ``.png``), 3D images float32 (default
    ``.nii.gz``); labels are uint8. Cases are ``phantom_000`` ... (training first, then test).
    A non-empty ``out_dir`` raises ``FileExistsError`` unless ``overwrite`` (which replaces
    imagesTr/labelsTr/imagesTs/labelsTs and the JSON files, leaving anything else alone).
    """
    shape, ending = _check_args(spatial_dims, shape, file_ending, num_train, num_test, num_sites)
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, overwrite)
    geometry, sites = phantom_geometry(spatial_dims), site_parameters(num_sites)
    metadata: dict[str, dict[str, str]] = {}
    for index in range(num_train + num_test):
        case_id, split = f"phantom_{index:03d}", "Tr" if index < num_train else "Ts"
        image, label = make_phantom_case(index, seed, shape, sites[index % num_sites])
        image = np.clip(np.round(image * 180.0), 0, 255).astype(np.uint8) if spatial_dims == 2 \
            else (image * 1000.0).astype(np.float32)
        write_image(image, geometry, out_dir / f"images{split}" / f"{case_id}_0000{ending}")
        write_image(label, geometry, out_dir / f"labels{split}" / f"{case_id}{ending}")
        metadata[case_id] = {"site": f"site{index % num_sites + 1}"}
    description = {
        "name": f"Phantom{spatial_dims}D",
        "description": f"medkd synthetic phantoms (seed {seed}, {num_sites} sites)",
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_train,
        "numTest": num_test,
        "file_ending": ending,
    }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2))
    (out_dir / "case_metadata.json").write_text(json.dumps(metadata, indent=2))
    return out_dir
