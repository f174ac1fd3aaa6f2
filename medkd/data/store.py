"""The on-disk cache of preprocessed cases (:mod:`medkd.data.preprocess`).

Preprocessed cases are written as ``.npy`` (read back memory-mapped) into
``<cache_root>/<dataset>_<plan fingerprint>/``, each with a JSON sidecar recording where it came from
(file sizes and modification times) and the size, dtype, shape and CRC-32 of its arrays
(:mod:`medkd.data.cache_integrity`). A case is reused only when plan and sources are unchanged and its
arrays match their record; the sidecar is written last, so a half-written case is never mistaken for a
finished one. ``MEDKD_CACHE`` sets the default root (``.cache/medkd``).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medkd.data.cache_integrity import file_problem_in_cache, image_problem, label_problem, write_recorded
from medkd.data.dataset import Case, DatasetError, DatasetInfo, read_case
from medkd.data.preprocess import PreprocessedCase, PreprocessingPlan, class_locations, preprocess_arrays
from medkd.storage import atomic_write_text

log = logging.getLogger(__name__)




def _source_fingerprint(case: Case) -> list[list[Any]]:
    files = [*case.image_files, *([case.label_file] if case.label_file else [])]
    out = []
    for path in files:
        stat = Path(path).stat()
        out.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def case_files(folder: Path, case_id: str) -> dict[str, Path]:
    """Where one preprocessed case lives: image, label, class locations and the JSON sidecar."""
    return {"image": folder / f"{case_id}_img.npy", "label": folder / f"{case_id}_seg.npy",
            "locations": folder / f"{case_id}_loc.npz", "sidecar": folder / f"{case_id}.json"}


def _check_values(case: Case, dataset: DatasetInfo, image: np.ndarray, label: np.ndarray | None) -> None:
    """Refuse values that would fail training later without naming the case (NaN logits, unknown labels)."""
    why = image_problem(image)
    if why is not None:
        raise DatasetError(f"case {case.case_id} ({', '.join(map(str, case.image_files))}): {why}; not cached")
    allowed = set(dataset.labels.values()) | ({dataset.ignore_label} if dataset.ignore_label is not None else set())
    why = None if label is None else label_problem(label, allowed)
    if why is not None:
        raise DatasetError(f"case {case.case_id} ({case.label_file}): {why}; not cached")


def _single_threaded() -> None:
    """Initialiser of the preprocessing pool's workers: one intra-op thread each (the pool is the parallelism).

    Only the workers: the main process keeps its thread count, which a training run's numerics depend on
    (a run that preprocessed in-process used to train on 1 thread, its resume on all of them).
    """
    torch.set_num_threads(1)


def _preprocess_and_store(args: tuple[Case, DatasetInfo, PreprocessingPlan, Path]) -> dict[str, Any]:
    case, dataset, plan, folder = args
    files = case_files(folder, case.case_id)
    image, label, geometry = read_case(case, dataset)
    image_pp, label_pp, props = preprocess_arrays(image, label, geometry, plan)
    _check_values(case, dataset, image_pp, label_pp)
    props["case_id"] = case.case_id
    props["metadata"] = dict(case.metadata)
    props["source"] = _source_fingerprint(case)
    records = {"image": write_recorded(files["image"], np.save, np.ascontiguousarray(image_pp))}
    if label_pp is not None:
        records["label"] = write_recorded(files["label"], np.save, np.ascontiguousarray(label_pp))
        locations = class_locations(label_pp, seed=0)
        props["classes_present"] = sorted(locations)
        records["locations"] = write_recorded(files["locations"], np.savez,
                                              **{f"c{k}": v for k, v in locations.items()})
    props["files"] = records
    atomic_write_text(files["sidecar"], json.dumps(props))  # last: marks the case complete
    return props


def _bar(total: int, description: str, enabled: bool):
    """``iterable -> iterable`` showing a tqdm bar of ``total`` cases when ``enabled``."""
    if not enabled:
        return lambda items: items
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, total=total, desc=description, unit="case", mininterval=1.0)


def default_cache_root() -> Path:
    return Path(os.environ.get("MEDKD_CACHE", ".cache/medkd"))


class PreprocessedStore:
    """Preprocessed cases of one dataset under one plan, in ``cache_root/<dataset>_<plan hash>``."""

    def __init__(self, dataset: DatasetInfo, plan: PreprocessingPlan, cache_root: Path | None = None):
        self.dataset = dataset
        self.plan = plan
        self.folder = Path(cache_root or default_cache_root()) / f"{dataset.name}_{plan.fingerprint()}"
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "plan.json", json.dumps(plan.to_dict(), indent=1))

    def _entry(self, case: Case, props: dict[str, Any]) -> PreprocessedCase:
        files = case_files(self.folder, case.case_id)
        has_label = files["label"].is_file()
        return PreprocessedCase(
            case_id=case.case_id,
            image_path=files["image"],
            label_path=files["label"] if has_label else None,
            locations_path=files["locations"] if has_label else None,
            properties=props,
        )

    def _cached_properties(self, case: Case) -> tuple[dict[str, Any] | None, str | None]:
        """The sidecar of a reusable cached case, else ``None`` and why a cached entry is unusable
        (why is ``None`` when nothing is cached or the sources changed: nothing to warn about)."""
        files = case_files(self.folder, case.case_id)
        if not files["sidecar"].is_file():
            return None, None
        try:
            props = json.loads(files["sidecar"].read_text())
        except (OSError, ValueError) as err:
            return None, f"has an unreadable sidecar {files['sidecar'].name} ({err})"
        if props.get("source") != _source_fingerprint(case):
            return None, None
        records = props.get("files")
        if not isinstance(records, dict):
            return None, "has no checksums (cached by an older medkd)"
        names = ["image", *(["label", "locations"] if case.label_file is not None else [])]
        for name in names:
            why = file_problem_in_cache(files[name], records.get(name))
            if why is not None:
                return None, why
        return props, None

    def ensure(self, cases: Sequence[Case], num_workers: int = 2, progress: bool = False) -> list[PreprocessedCase]:
        """Preprocess what is missing, stale or damaged (in parallel, with a progress bar if ``progress``),
        reuse the rest; keeps ``cases`` order.

        A damaged entry (size, dtype, shape or CRC-32 differ from its record) is rebuilt with a warning
        naming the case; its id is in :attr:`rebuilt` afterwards.
        """
        cached: dict[str, dict[str, Any] | None] = {}
        self.rebuilt: list[str] = []
        for case in cases:
            cached[case.case_id], why = self._cached_properties(case)
            if why is not None:
                log.warning("preprocessing cache %s: case %s %s; rebuilding it", self.folder, case.case_id, why)
                self.rebuilt.append(case.case_id)
        todo = [case for case in cases if cached[case.case_id] is None]
        if todo:
            jobs = [(case, self.dataset, self.plan, self.folder) for case in todo]
            bar = _bar(len(jobs), f"preprocess {self.dataset.name} into the cache", progress)
            if num_workers > 1 and len(todo) > 1:
                with ProcessPoolExecutor(max_workers=num_workers, initializer=_single_threaded) as pool:
                    results = list(bar(pool.map(_preprocess_and_store, jobs)))
            else:
                results = [_preprocess_and_store(job) for job in bar(jobs)]
            cached.update({case.case_id: props for case, props in zip(todo, results)})
        self.last_reused = len(cases) - len(todo)
        return [self._entry(case, cached[case.case_id]) for case in cases]
