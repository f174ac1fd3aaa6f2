r"""Teacher-output cache: the teachers' combined soft target for every training case, computed once.

Distilling from a live ensemble costs ``M`` teacher forwards per step; with the cache a step costs a
memory-mapped read, whatever ``M``. Per training case the cache holds the *target logits* ``g``
of :func:`medkd.teachers.combine.target_logits` on the preprocessed grid, ``(K, z, y, x)`` float16,
so a logit loss with temperature ``T`` sees ``softmax(g / T)`` = the combined target:

* teachers run on the un-augmented preprocessed case as ``medkd predict`` runs them: MONAI's Gaussian
  sliding window over the training patch size, slice by slice in 2D mode. (Whole-slice 2D targets
  were measured worse: a UNet trained on 128-px patches of ACDC scored 0.805 mean test Dice on whole
  slices against 0.864 with the sliding window, because instance-norm statistics over a whole slice
  differ from those over a training patch);
* ``top_k`` (optional) keeps the ``k`` largest target logits per voxel and one ``rest`` value
  ``T log(mean of the remaining classes' probability at T)``, so the top-k probabilities and the
  total remaining mass are kept exactly (at the cached ``T``) and the rest is spread evenly;
* the sampler crops the cached target with the same window as image and label, and spatial
  augmentations move it with them (bilinear), see :class:`medkd.data.loaders.PatchDataset`.
  Outside the image (padding) the target logits are 0, i.e. a uniform target.

Layout: ``<cache_root>/teacher_outputs/<key>/`` with ``meta.json`` and per case ``<id>_t.npy``
(``_ti.npy``/``_tr.npy`` for top-k) plus ``<id>_t.json`` written last. The key hashes the teacher
set (checkpoint bytes), the preprocessing plan and the target specification, so a changed teacher
or preprocessing gives a new key (old folders stay until deleted). Each case's sidecar records the
CRC-32 and size of its files and the source files of the preprocessed case; a missing, partial
(no sidecar) or corrupted (size or CRC mismatch) entry is recomputed with a warning, never used.
Filling holds an exclusive lock on ``.fill.lock`` in the folder: a second process that needs the same
entries (two slots of a study distilling from one teacher) waits for the first and computes only what
is still missing, instead of computing every case twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from medkd.data.preprocess import PreprocessedCase, PreprocessingPlan
from medkd.data.store import default_cache_root
from medkd.losses.supervised import full_resolution_head
from medkd.storage import atomic_write_numpy, atomic_write_text, exclusive_lock, file_problem, file_record
from medkd.teachers.combine import COMBINATION_RULES, target_logits
from medkd.teachers.manifest import TeacherSet

log = logging.getLogger(__name__)
CACHE_FORMAT = "medkd-teacher-cache-v2"  # v2: 2D targets from the sliding window, not whole slices
FILL_LOCK = ".fill.lock"


@dataclass(frozen=True)
class TargetSpec:
    """What is cached: the combination rule, its options and the temperature of the consuming loss."""

    rule: str = "mean_prob"
    temperature: float = 1.0
    member_weights: tuple[float, ...] | None = None
    temperature_w: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in COMBINATION_RULES:
            raise ValueError(f"teachers.combine must be one of {', '.join(COMBINATION_RULES)} to be cached, "
                             f"got {self.rule!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"teachers.top_k must be >= 1, got {self.top_k}")

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"member_weights": self.member_weights}
        if self.rule == "adaptive":
            opts["temperature_w"] = self.temperature_w
        return opts


def cache_key(teacher_fingerprint: str, plan: PreprocessingPlan, spec: TargetSpec, patch_size: Sequence[int]) -> str:
    text = json.dumps({"teachers": teacher_fingerprint, "plan": plan.to_dict(), "target": asdict(spec),
                       "patch_size": list(patch_size), "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.inference_mode()
def member_logits(networks: Sequence[nn.Module], image: torch.Tensor, *, mode: str,
                  patch_size: Sequence[int]) -> torch.Tensor:
    """Member logits ``(M, B, K, *spatial)`` for a batch of 2D slices ``(B, C, y, x)`` or 3D volumes."""
    outputs = []
    for network in networks:
        out = sliding_window_inference(image, list(patch_size), 8 if mode == "2d" else 2, network, overlap=0.5,
                                       mode="gaussian")
        outputs.append(full_resolution_head(out, image.ndim))
    return torch.stack(outputs)


def case_target(networks: Sequence[nn.Module], image: np.ndarray, spec: TargetSpec, *, mode: str,
                patch_size: Sequence[int], device: torch.device, chunk: int = 8) -> torch.Tensor:
    """Target logits ``(K, z, y, x)`` float32 (on CPU) of one preprocessed case ``(C, z, y, x)``."""
    volume = torch.tensor(np.asarray(image, dtype=np.float32))
    batches = [volume.permute(1, 0, 2, 3)[i:i + chunk] for i in range(0, volume.shape[1], chunk)] \
        if mode == "2d" else [volume[None]]
    parts = []
    for batch in batches:
        stack = member_logits(networks, batch.to(device), mode=mode, patch_size=patch_size)
        parts.append(target_logits(spec.rule, stack.float(), spec.temperature, **spec.options()).cpu())
    target = torch.cat(parts).permute(1, 0, 2, 3) if mode == "2d" else parts[0][0]
    if not torch.isfinite(target).all():
        raise ValueError("teacher output contains NaN/Inf; the teacher checkpoint is broken")
    return target.contiguous()


def encode_top_k(target: torch.Tensor, k: int, temperature: float) -> dict[str, np.ndarray]:
    """Top-k target logits, their class indices and one ``rest`` value per voxel (float16/uint8)."""
    values, indices = target.topk(k, dim=0)
    num_rest = target.shape[0] - k
    if num_rest == 0:
        rest = torch.zeros_like(values[:1])
    else:
        log_p = F.log_softmax(target / temperature, dim=0)
        rest_mass = (1.0 - log_p.gather(0, indices).exp().sum(0, keepdim=True)).clamp_min(1e-12)
        # the top-k logits are shifted into log-probability form so that the rest value can join them
        shift = torch.logsumexp(target / temperature, dim=0, keepdim=True) * temperature
        values = values - shift
        rest = temperature * (rest_mass / num_rest).log()
    return {"values": values.half().numpy(), "indices": indices.to(torch.uint8).numpy(), "rest": rest.half().numpy()}


def decode_top_k(values: np.ndarray, indices: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Full ``(K, *spatial)`` float32 target logits from :func:`encode_top_k`'s arrays."""
    full = np.repeat(rest.astype(np.float32), num_classes, axis=0)
    np.put_along_axis(full, indices.astype(np.int64), values.astype(np.float32), axis=0)
    return full


@dataclass
class CachedTarget:
    """One case's cached target, cropped on demand like the image (memory-mapped, read-only)."""

    files: dict[str, Path]
    num_classes: int

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: np.load(path, mmap_mode="r") for name, path in self.files.items()}

    def crop(self, z: int | None, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Target logits ``(K, *size)`` float32 at slice ``z`` (2D) and window ``start``; 0 outside the case."""
        from medkd.data.loaders import crop_or_pad

        arrays = self._arrays()
        window = {name: crop_or_pad(a[:, z] if z is not None else a, start, size) for name, a in arrays.items()}
        if "values" in window:
            return decode_top_k(window["values"], window["indices"], window["rest"], self.num_classes)
        return window["logits"].astype(np.float32)

    def full(self) -> np.ndarray:
        """The whole case's target logits ``(K, z, y, x)`` float32."""
        arrays = self._arrays()
        if "values" in arrays:
            return decode_top_k(arrays["values"], arrays["indices"], arrays["rest"], self.num_classes)
        return np.asarray(arrays["logits"], dtype=np.float32)


class TeacherOutputCache:
    """Cached combined teacher targets for a list of preprocessed training cases (see module docstring)."""

    def __init__(self, folder: Path, spec: TargetSpec, num_classes: int, patch_size: Sequence[int]):
        self.folder, self.spec, self.num_classes = Path(folder), spec, num_classes
        self.patch_size = list(patch_size)  # 3D sliding-window size
        self.rebuilt: list[str] = []  # case ids recomputed by the last ``ensure``

    @classmethod
    def for_teachers(cls, teachers: TeacherSet, plan: PreprocessingPlan, spec: TargetSpec, num_classes: int,
                     patch_size: Sequence[int], cache_root: Path | None = None) -> "TeacherOutputCache":
        key = cache_key(teachers.fingerprint(), plan, spec, patch_size)
        folder = Path(cache_root or default_cache_root()) / "teacher_outputs" / key
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "teachers": str(teachers.source), "members": [m.name for m in teachers.members],
                "plan": plan.fingerprint(), "target": asdict(spec), "patch_size": list(patch_size)}
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
        return cls(folder, spec, num_classes, patch_size)

    def _files(self, case_id: str) -> dict[str, Path]:
        if self.spec.top_k is None:
            return {"logits": self.folder / f"{case_id}_t.npy"}
        return {"values": self.folder / f"{case_id}_t.npy", "indices": self.folder / f"{case_id}_ti.npy",
                "rest": self.folder / f"{case_id}_tr.npy"}

    def _sidecar(self, case_id: str) -> Path:
        return self.folder / f"{case_id}_t.json"

    def problem(self, case: PreprocessedCase) -> str | None:
        """Why the cached entry of ``case`` cannot be used (``None`` when it is complete and intact)."""
        sidecar = self._sidecar(case.case_id)
        if not sidecar.is_file():
            return "missing or partial (no sidecar)"
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable sidecar {sidecar.name}: {err}"
        if meta.get("source") != case.properties.get("source"):
            return "the preprocessed case changed"
        for name, path in self._files(case.case_id).items():
            why = file_problem(path, meta.get("files", {}).get(name))
            if why is not None:
                return why
        return None

    def _write(self, case: PreprocessedCase, target: torch.Tensor) -> None:
        files = self._files(case.case_id)
        if self.spec.top_k is None:
            arrays = {"logits": target.half().numpy()}
        else:
            arrays = encode_top_k(target, min(self.spec.top_k, target.shape[0]), self.spec.temperature)
        for name, array in arrays.items():
            atomic_write_numpy(files[name], np.save, np.ascontiguousarray(array))
        record = {name: file_record(files[name]) for name in files}
        sidecar = {"format": CACHE_FORMAT, "case_id": case.case_id, "shape": list(target.shape),
                   "source": case.properties.get("source"), "files": record}
        atomic_write_text(self._sidecar(case.case_id), json.dumps(sidecar))  # last: marks the entry complete

    def _missing(self, cases: Sequence[PreprocessedCase], warn: bool = False) -> list[PreprocessedCase]:
        """The cases whose entry is missing, partial, stale or corrupted (a warning for a damaged one if ``warn``)."""
        todo = []
        for case in cases:
            why = self.problem(case)
            if why is None:
                continue
            if warn and (self._sidecar(case.case_id).is_file()
                         or any(p.is_file() for p in self._files(case.case_id).values())):
                log.warning("teacher cache %s: case %s %s; recomputing", self.folder, case.case_id, why)
            todo.append(case)
        return todo

    def _compute(self, todo: Sequence[PreprocessedCase], networks: Sequence[nn.Module], *, mode: str,
                 device: str | torch.device, member_outputs: Callable[[PreprocessedCase], torch.Tensor] | None,
                 progress: bool) -> None:
        """Compute and write the entries of ``todo`` (see :meth:`ensure`)."""
        if not todo:
            return
        device = torch.device(device)
        for network in networks:
            network.to(device).eval()
        log.info("teacher cache: computing %d case(s) with %d teacher(s)", len(todo), len(networks))
        if progress:
            from tqdm.auto import tqdm

            todo = tqdm(todo, desc=f"teacher-output cache: {len(networks)} teacher(s) predict {len(todo)} case(s)",
                        unit="case", mininterval=1.0)
        for case in todo:
            if member_outputs is not None:
                target = target_logits(self.spec.rule, member_outputs(case)[:, None], self.spec.temperature,
                                       **self.spec.options())[0].contiguous()
            else:
                target = case_target(networks, case.load_image(), self.spec, mode=mode,
                                     patch_size=self.patch_size, device=device)
            self._write(case, target)

    def ensure(self, cases: Sequence[PreprocessedCase], networks: Sequence[nn.Module], *, mode: str,
               in_channels: int, device: str | torch.device = "cpu",
               member_outputs: Callable[[PreprocessedCase], torch.Tensor] | None = None,
               progress: bool = True) -> list[CachedTarget]:
        """Compute the entries that are missing, partial, stale or corrupted (a progress bar naming the work if
        ``progress``); return all, in ``cases`` order.

        ``member_outputs(case)``, when given, replaces running ``networks`` on the preprocessed case: it
        returns the members' logits ``(M, K, z, y, x)`` on the case's grid (teachers that preprocess
        differently, :class:`medkd.engine.teacher_grid.MappedTeacherOutputs`), combined by the spec's rule.
        """
        todo = self._missing(cases, warn=True)
        if todo:  # another process filling this cache (a study's other slot): wait, then keep what it wrote
            with exclusive_lock(self.folder / FILL_LOCK, on_wait=lambda: log.warning(
                    "teacher cache %s: another process is filling it; waiting for it", self.folder)):
                todo = self._missing(todo)
                self._compute(todo, networks, mode=mode, device=device, member_outputs=member_outputs,
                              progress=progress)
        self.rebuilt = [case.case_id for case in todo]
        return [CachedTarget(self._files(case.case_id), self.num_classes) for case in cases]

