"""Dataset validation: list every problem in a dataset instead of failing on the first.

Problem kinds (``Problem.kind``):

- ``bad-dataset-json``: dataset.json missing/malformed (then it is the only problem), or
  ``numTraining`` disagreeing with the discovered cases
- ``empty-dataset``: no training cases
- ``missing-file``: an expected image channel or label file does not exist
- ``unreadable``: a file exists but cannot be read (corrupt, truncated, RGB png, ...)
- ``shape-mismatch``: channel/label spatial shapes differ, or wrong number of channels
- ``geometry-mismatch``: spacing, origin or direction differ between channels/label
- ``unknown-label``: label values not declared in dataset.json (or non-integer values)
- ``nan-inf``: NaN or Inf voxels in an image
- ``orphan-file``: a file in imagesTr/labelsTr/imagesTs/labelsTs that belongs to no case
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkd.data.dataset import Case, DatasetError, DatasetInfo, image_folder_cases, load_dataset
from medkd.data.io import Geometry, ImageReadError, PathLike, read_image


@dataclass
class Problem:
    """One problem found in a dataset; ``kind`` is a short slug (see module docstring)."""

    kind: str
    message: str
    case: str | None = None
    file: Path | None = None

    def __str__(self) -> str:
        parts = [f"case {self.case}" if self.case else "", f"file {self.file}" if self.file else ""]
        where = ", ".join(part for part in parts if part)
        return f"[{self.kind}] {where}: {self.message}" if where else f"[{self.kind}] {self.message}"


@dataclass
class _Loaded:
    path: Path
    array: np.ndarray
    geometry: Geometry


def _read(path: Path, case: Case, what: str, problems: list[Problem]) -> _Loaded | None:
    if not path.exists():
        problems.append(Problem("missing-file", f"{what} file is missing", case.case_id, path))
        return None
    try:
        array, geometry = read_image(path)
    except ImageReadError as exc:
        problems.append(Problem("unreadable", f"{what}: {exc.reason}", case.case_id, path))
        return None
    return _Loaded(path, array, geometry)


def _check_finite(item: _Loaded, case: Case, problems: list[Problem]) -> None:
    if not np.issubdtype(item.array.dtype, np.floating):
        return
    n_nan, n_inf = int(np.isnan(item.array).sum()), int(np.isinf(item.array).sum())
    if n_nan or n_inf:
        problems.append(Problem("nan-inf", f"image has {n_nan} NaN and {n_inf} Inf voxels", case.case_id, item.path))


def _spatial_shape(item: _Loaded) -> tuple[int, ...]:
    return item.array.shape[-item.geometry.ndim :]


def _channels_in(item: _Loaded) -> int:
    return item.array.shape[0] if item.array.ndim > item.geometry.ndim else 1


def _compare(item: _Loaded, ref: _Loaded, case: Case, what: str, problems: list[Problem]) -> None:
    """Spatial shape and geometry of ``item`` against the reference image."""
    if _spatial_shape(item) != _spatial_shape(ref):
        problems.append(Problem(
            "shape-mismatch",
            f"{what} spatial shape {_spatial_shape(item)} differs from {ref.path.name} {_spatial_shape(ref)}",
            case.case_id, item.path,
        ))
        return
    for name in item.geometry.differences(ref.geometry):
        if name == "ndim":
            continue  # same numpy shape with different geometry ndim cannot happen; guarded anyway
        problems.append(Problem(
            "geometry-mismatch",
            f"{what} {name} {getattr(item.geometry, name)} differs from {ref.path.name} {getattr(ref.geometry, name)}",
            case.case_id, item.path,
        ))


def _check_images(case: Case, info: DatasetInfo, problems: list[Problem]) -> _Loaded | None:
    """Read and check all image files of a case; return the reference (first readable) image."""
    loaded: list[_Loaded] = []
    for index, path in enumerate(case.image_files):
        what = f"image channel {index}" if info.format == "nnunet" else "image"
        item = _read(path, case, what, problems)
        if item is not None:
            _check_finite(item, case, problems)
            loaded.append(item)
    if not loaded:
        return None
    ref = loaded[0]
    for item in loaded[1:]:
        _compare(item, ref, case, f"image {item.path.name}", problems)
    if len(loaded) == len(case.image_files):
        found = sum(_channels_in(item) for item in loaded)
        if found != info.num_channels:
            problems.append(Problem(
                "shape-mismatch",
                f"case has {found} image channel(s), dataset.json declares {info.num_channels}",
                case.case_id, ref.path,
            ))
    return ref


def _label_values(label: np.ndarray) -> np.ndarray:
    if np.issubdtype(label.dtype, np.integer) and label.size and label.min() >= 0 and label.max() < 1 << 16:
        return np.flatnonzero(np.bincount(label.ravel()))
    return np.unique(label)


def _check_label(case: Case, info: DatasetInfo, ref: _Loaded | None, problems: list[Problem]) -> None:
    if case.label_file is None:
        return
    item = _read(case.label_file, case, "label", problems)
    if item is None:
        return
    if ref is not None:
        if item.array.ndim != item.geometry.ndim:
            problems.append(Problem("shape-mismatch", f"label has {item.array.ndim} dimensions with "
                                    f"{_channels_in(item)} channels; expected one channel", case.case_id, item.path))
            return
        _compare(item, ref, case, "label", problems)
    values = _label_values(item.array)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        problems.append(Problem("unknown-label", "label contains non-integer or non-finite values",
                                case.case_id, item.path))
        return
    allowed = set(info.labels.values()) | ({info.ignore_label} if info.ignore_label is not None else set())
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        problems.append(Problem(
            "unknown-label",
            f"label values {unknown} are not declared in dataset.json 'labels' (declared: {sorted(allowed)})",
            case.case_id, item.path,
        ))


def check_case(case: Case, info: DatasetInfo) -> list[Problem]:
    """All problems of one case (files, readability, shapes, geometry, labels, NaN/Inf)."""
    problems: list[Problem] = []
    ref = _check_images(case, info, problems)
    _check_label(case, info, ref, problems)
    return problems


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _nnunet_orphans(info: DatasetInfo, images: Path, labels: Path, cases: list[Case]) -> list[Problem]:
    ending, ids = info.file_ending, {c.case_id for c in cases}
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    problems: list[Problem] = []
    partial: set[str] = set()
    for path in _visible_files(images):
        m = pattern.match(path.name)
        if m is None:
            problems.append(Problem("orphan-file", f"image name does not follow CASE_XXXX{ending} "
                                    "(file_ending in dataset.json)", None, path))
        elif int(m.group(2)) >= info.num_channels:
            problems.append(Problem("orphan-file", f"channel {int(m.group(2))} is not declared in dataset.json "
                                    f"'channel_names' ({info.num_channels} channel(s))", m.group(1), path))
        elif m.group(1) not in ids and m.group(1) not in partial:
            partial.add(m.group(1))
            missing = images / f"{m.group(1)}_0000{ending}"
            problems.append(Problem("missing-file", "image channel 0 file is missing, so the case is not "
                                    "discovered although other channel files exist", m.group(1), missing))
    for path in _visible_files(labels):
        if not path.name.endswith(ending):
            problems.append(Problem("orphan-file", f"label ending differs from file_ending {ending!r}", None, path))
        elif path.name[: -len(ending)] not in ids | partial:
            problems.append(Problem("orphan-file", f"label file without an image ({images.name}/"
                                    f"{path.name[: -len(ending)]}_0000{ending} not found)",
                                    path.name[: -len(ending)], path))
    return problems


def _msd_orphans(info: DatasetInfo, folders: list[Path]) -> list[Problem]:
    listed = {p.resolve() for c in (*info.training, *info.test) for p in (*c.image_files, c.label_file) if p}
    problems = []
    for folder in folders:
        for path in _visible_files(folder):
            if path.resolve() not in listed:
                what = "label file without an image" if folder.name.startswith("labels") else "image"
                problems.append(Problem("orphan-file", f"{what} not listed in dataset.json", None, path))
    return problems


def find_orphans(info: DatasetInfo, include_test: bool = True) -> list[Problem]:
    """Files in imagesTr/labelsTr (and imagesTs/labelsTs) that belong to no case."""
    pairs = [("imagesTr", "labelsTr", info.training)] + ([("imagesTs", "labelsTs", info.test)] if include_test else [])
    if info.format == "msd":
        return _msd_orphans(info, [info.root / name for a, b, _ in pairs for name in (a, b)])
    return [p for a, b, cases in pairs for p in _nnunet_orphans(info, info.root / a, info.root / b, cases)]


def _iterate(cases: list[Case], progress: bool) -> Iterable[Case]:
    if not progress:
        return cases
    from tqdm import tqdm

    return tqdm(cases, desc="checking cases", unit="case")


def check_dataset(root: PathLike, include_test: bool = True, progress: bool = False) -> list[Problem]:
    """Every problem in the dataset at ``root`` (empty list: dataset is clean).

    A missing/malformed dataset.json gives a single ``bad-dataset-json`` problem. Otherwise each
    training case (and test case when ``include_test``) is read completely and checked.
    """
    root = Path(root)
    try:
        info = load_dataset(root)
        info.num_classes  # validates consecutive label values
    except DatasetError as exc:
        return [Problem("bad-dataset-json", str(exc), None, root / "dataset.json")]
    problems: list[Problem] = []
    if not info.training:
        problems.append(Problem("empty-dataset", "no training cases found (nnU-Net: imagesTr/*_0000"
                                f"{info.file_ending}; MSD: 'training' list)", None, root / "imagesTr"))
    declared = info.declared_num_training
    if declared is not None and declared != len(info.training):
        problems.append(Problem("bad-dataset-json", f"key 'numTraining' is {declared} but "
                                f"{len(info.training)} training case(s) were found", None, root / "dataset.json"))
    cases = info.training + (info.test if include_test else [])
    for case in _iterate(cases, progress):
        problems.extend(check_case(case, info))
    problems.extend(find_orphans(info, include_test))
    return problems


def check_image_folder(folder: PathLike, info: DatasetInfo) -> list[Problem]:
    """Every problem of an images-only folder used as unlabelled data for ``info``'s dataset.

    The images must follow the dataset's naming and file ending (``CASE_XXXX<file_ending>``), have all
    of its channels with one shape and geometry per case, be readable and hold no NaN/Inf voxels.
    """
    folder = Path(folder)
    try:
        cases = image_folder_cases(folder, info, prefixed=False)
    except DatasetError as exc:
        return [Problem("missing-file", str(exc), None, folder)]
    problems = [] if cases else [Problem("empty-dataset", f"no images named CASE_0000{info.file_ending} "
                                         "(file_ending of the dataset)", None, folder)]
    for case in cases:
        problems.extend(check_case(case, info))
    problems.extend(_nnunet_orphans(info, folder, folder / ".no-labels", cases))
    return problems
