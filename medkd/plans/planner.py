"""Plan runs from a dataset fingerprint: nnU-Net's experiment planner, re-implemented for a CPU budget.

Configurations: ``2d`` (every dataset), ``3d_fullres`` (3D data) and ``3d_lowres`` (3D data whose median
image exceeds :data:`LOWRES_MIN_VOXELS`, nnU-Net's threshold at its reference patch). Per configuration:

* target spacing: the median spacing; an axis more than 3x coarser than the others (and holding fewer
  than a third of their voxels) gets the 10th percentile of its spacings instead (nnU-Net's rule);
  2D plans resample in-plane only, images without physical spacing (PNG) are not resampled;
* normalisation per channel: ``ct`` for channels named CT, else ``zscore``;
* patch: nnU-Net's start (the spacing's aspect ratio, 256^3 or 2048^2 voxels, clipped to the median
  image), stages and pooling per axis from :mod:`medkd.plans.topology`, then, while a teacher step of
  batch 2 exceeds the budget (:class:`~medkd.plans.cost.Budget`: ``min_steps`` in ``minutes``), the
  teacher's width is halved (``shrink`` 1, then 2) and after that the axis largest relative to the
  median image shrinks, down to the patch floor; every such trade is listed in ``trades``;
* batch: what the budget's step time and memory allow for that patch, capped so that one batch covers
  at most 5% of the dataset's voxels, at least 2 (nnU-Net);
* teacher and student: medkd's ``unet`` with nnU-Net's widths per stage and the planned strides; the
  student is the teacher at 8x narrower widths (shrink + 3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medkd.plans.cost import Budget, NetworkCost, unet_channels, unet_cost
from medkd.plans.topology import initial_patch_size, reduce_patch, topology

PLANS_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0
MAX_DATASET_COVERED = 0.05
MIN_BATCH = 2
FIT_BATCH = {2: 8, 3: 2}  # the batch a teacher step must fit while width and patch are traded (see _fit_patch)
MAX_TEACHER_SHRINK = 2
STUDENT_EXTRA_SHRINK = 3
PATCH_FLOOR = {2: 64, 3: 32}  # per-axis patch floor before the teacher gets narrower (or the median image)
LOWRES_MIN_VOXELS = 4 * 128 ** 3  # nnU-Net makes 3d_lowres when its ~128^3 patch covers < 25% of the image
LOWRES_SPACING_STEP = 1.05
LOWRES_MAX_ITERATIONS = 200


def fullres_spacing(fingerprint: dict[str, Any]) -> list[float]:
    """Target spacing (z, y, x): the median, or for an anisotropic coarse axis its 10th percentile."""
    spacings = np.asarray(fingerprint["spacings"], np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], np.float64)
    target, sizes = np.median(spacings, axis=0), np.median(shapes, axis=0)
    if fingerprint["spatial_dims"] == 2:
        return target.tolist()
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        tenth = float(np.percentile(spacings[:, worst], 10))
        if tenth < max(target[i] for i in others):
            tenth = max(max(target[i] for i in others), tenth) + 1e-5
        target[worst] = tenth
    return target.tolist()


def _median_shape_at(fingerprint: dict[str, Any], spacing: list[float]) -> list[float]:
    """Median (z, y, x) shape after resampling every case to ``spacing``."""
    shapes = np.asarray(fingerprint["shapes_after_crop"], np.float64)
    spacings = np.asarray(fingerprint["spacings"], np.float64)
    return np.median(shapes * spacings / np.asarray(spacing), axis=0).tolist()


def _dataset_voxels_at(fingerprint: dict[str, Any], spacing: list[float]) -> float:
    shapes = np.asarray(fingerprint["shapes_after_crop"], np.float64)
    spacings = np.asarray(fingerprint["spacings"], np.float64)
    return float(np.prod(shapes * spacings / np.asarray(spacing), axis=1).sum())


def normalization_schemes(fingerprint: dict[str, Any]) -> list[str]:
    return ["ct" if name.strip().upper() == "CT" else "zscore" for name in fingerprint["channel_names"]]


def _cost(fingerprint: dict[str, Any], num_classes: int, dims: int, strides, shrink: int) -> NetworkCost:
    return unet_cost(dims, fingerprint["num_channels"], num_classes, unet_channels(len(strides) + 1, dims),
                     tuple(tuple(s) for s in strides), shrink)


def _fits(cost: NetworkCost, patch, batch: int, budget: Budget) -> bool:
    return cost.step_seconds(patch, batch, budget) <= budget.step_seconds and \
        cost.memory_gb(patch, batch) <= budget.memory_gb


def _fit_patch(fingerprint, num_classes, spacing, median_shape, budget) -> tuple[Any, int, list[str]]:
    """Narrow the teacher (then shrink the patch) until a teacher step of batch 2 fits the budget.

    Width goes first, unlike nnU-Net (which keeps its widths and shrinks the patch to fit a GPU's memory):
    on a CPU the budget is time, and at equal time a narrower teacher that makes more steps on the same
    patch scored higher (``benchmarks/acdc_2d_teacher_ablation.py``: quarter width 0.896 vs full 0.886).
    """
    dims = len(spacing)
    topo = topology(spacing, initial_patch_size(spacing, median_shape))
    start, shrink, trades = topo.patch_size, 0, []
    floor = [max(8, min(PATCH_FLOOR[dims], int(round(m)))) for m in median_shape]
    batch = FIT_BATCH[dims]
    while not _fits(_cost(fingerprint, num_classes, dims, topo.strides, shrink), topo.patch_size, batch, budget):
        smaller = reduce_patch(topo.patch_size, median_shape, spacing, floor)
        if shrink < MAX_TEACHER_SHRINK:
            shrink += 1
        elif smaller is not None and math.prod(smaller) < math.prod(topo.patch_size):
            topo = topology(spacing, smaller)
        else:
            trades.append(f"still over budget at the smallest patch and a teacher at 1/{2 ** shrink} width")
            break
    if shrink:
        trades.append(f"teacher widths / {2 ** shrink} (shrink {shrink}): a step of batch {batch} within "
                      f"{budget.step_seconds:.1f} s")
    if topo.patch_size != start:
        trades.append(f"patch {'x'.join(map(str, start))} -> {'x'.join(map(str, topo.patch_size))} "
                      f"(the narrowest teacher alone did not fit)")
    return topo, shrink, trades


def _batch_size(cost: NetworkCost, patch, dataset_voxels: float, budget: Budget, trades: list[str]) -> int:
    by_time = int(budget.step_seconds / cost.step_seconds(patch, 1, budget))
    by_memory = int((budget.memory_gb - cost.memory_gb(patch, 0)) / max(1e-12, cost.memory_gb(patch, 1) -
                                                                        cost.memory_gb(patch, 0)))
    by_coverage = round(dataset_voxels * MAX_DATASET_COVERED / math.prod(patch))
    batch = max(MIN_BATCH, min(by_time, by_memory, by_coverage))
    if batch == MIN_BATCH and min(by_time, by_memory) <= MIN_BATCH:
        trades.append(f"batch {MIN_BATCH} (the minimum) to stay within the step time")
    elif batch == by_coverage and by_coverage < min(by_time, by_memory):
        trades.append(f"batch capped at {batch}: one batch sees at most 5% of the dataset's voxels")
    return batch


def _network(cost: NetworkCost, shrink: int, channels, strides, patch, batch, budget: Budget) -> dict[str, Any]:
    step = cost.step_seconds(patch, batch, budget)
    return {"model": "unet", "shrink": shrink, "channels": list(channels), "strides": [list(s) for s in strides],
            "parameters": cost.parameters, "gmacs_per_step": round(cost.macs_per_voxel * math.prod(patch) * batch
                                                                   / 1e9, 3),
            "est_step_s": round(step, 3), "est_steps_in_budget": int(budget.minutes * 60 / step),
            "est_memory_gb": round(cost.memory_gb(patch, batch), 3)}


def plan_configuration(fingerprint: dict[str, Any], num_classes: int, spacing_zyx: list[float], mode: str,
                       budget: Budget) -> dict[str, Any]:
    """One configuration's plan at ``spacing_zyx`` (``mode`` "2d": the in-plane axes only)."""
    dims = 2 if mode == "2d" else 3
    median_zyx = _median_shape_at(fingerprint, spacing_zyx)
    spacing, median_shape = spacing_zyx[-dims:], median_zyx[-dims:]
    topo, shrink, trades = _fit_patch(fingerprint, num_classes, spacing, median_shape, budget)
    patch = list(topo.patch_size)
    voxels = _dataset_voxels_at(fingerprint, spacing_zyx)
    teacher_cost = _cost(fingerprint, num_classes, dims, topo.strides, shrink)
    batch = _batch_size(teacher_cost, patch, voxels, budget, trades)
    channels = unet_channels(topo.num_stages, dims)
    student_shrink = shrink + STUDENT_EXTRA_SHRINK
    student_cost = _cost(fingerprint, num_classes, dims, topo.strides, student_shrink)
    return {
        "mode": mode, "target_spacing": [float(s) for s in spacing_zyx] if fingerprint["physical_spacing"] else None,
        "median_shape": [round(s, 1) for s in median_zyx], "patch_size": patch, "batch_size": batch,
        "normalization": normalization_schemes(fingerprint), "num_stages": topo.num_stages,
        "pools_per_axis": list(topo.pools_per_axis), "strides": [list(s) for s in topo.strides],
        "teacher": _network(teacher_cost, shrink, channels, topo.strides, patch, batch, budget),
        "student": _network(student_cost, student_shrink, channels, topo.strides, patch, batch, budget),
        "trades": trades,
    }


def _lowres(fingerprint, num_classes, fullres: dict[str, Any], budget: Budget) -> dict[str, Any] | None:
    """nnU-Net's 3d_lowres: coarser spacing until the patch covers >= 25% of the median image."""
    spacing = np.asarray(fullres["target_spacing"] or fingerprint["median_spacing"], np.float64)
    if math.prod(fullres["median_shape"]) <= LOWRES_MIN_VOXELS:
        return None
    plan = None
    for _ in range(LOWRES_MAX_ITERATIONS):
        coarse = spacing.max() / spacing > 2
        spacing = spacing * np.where(coarse, LOWRES_SPACING_STEP, 1.0) if coarse.any() else spacing * LOWRES_SPACING_STEP
        plan = plan_configuration(fingerprint, num_classes, spacing.tolist(), "3d", budget)
        if math.prod(plan["patch_size"]) / math.prod(plan["median_shape"]) >= 0.25:
            break
    return plan


def plan_dataset(fingerprint: dict[str, Any], num_classes: int, budget: Budget | None = None) -> dict[str, Any]:
    """Plans of every configuration for a dataset (see the module doc); JSON-ready."""
    budget = budget or Budget()
    spacing = fullres_spacing(fingerprint)
    configurations = {"2d": plan_configuration(fingerprint, num_classes, spacing, "2d", budget)}
    if fingerprint["spatial_dims"] == 3:
        configurations["3d_fullres"] = plan_configuration(fingerprint, num_classes, spacing, "3d", budget)
        lowres = _lowres(fingerprint, num_classes, configurations["3d_fullres"], budget)
        if lowres is not None:
            configurations["3d_lowres"] = lowres
    summary = {k: v for k, v in fingerprint.items() if k not in ("spacings", "shapes_after_crop")}
    return {"medkd_plans_version": PLANS_VERSION, "dataset": fingerprint["dataset"], "num_classes": num_classes,
            "budget": budget.to_dict(),
            "fingerprint": summary, "configurations": configurations}
