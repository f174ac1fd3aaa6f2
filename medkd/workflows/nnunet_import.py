"""Import a trained nnU-Net v2 model (a results folder) as a medkd teacher set (``medkd import-nnunet``).

``import_nnunet(RESULTS_DIR, "2d", [0, 1, 2, 3, 4], OUT)`` reads ``plans.json`` and ``dataset.json``,
loads each ``fold_X/checkpoint_final.pth`` with ``weights_only=True`` (:func:`medkd.storage.load_weights_only`),
rebuilds the fold's network from the plans' architecture entry (:mod:`medkd.models.nnunet`), loads its
``network_weights`` (strictly: every tensor must fit) and writes a self-contained teacher set::

    OUT/teachers.json                  kind "nnunet", one member per fold, labels of dataset.json
    OUT/members/fold_X/best.pt         a medkd checkpoint: model "nnunet" (the architecture entry), the
                                       weights, nnU-Net's preprocessing plan and patch size, the labels,
                                       the TTA axes the checkpoint allows, and where it came from
    OUT/nnunet/plans.json, dataset.json  copies, for the record
    OUT/postprocessing.json            nnU-Net's post-processing decision, when the results folder has one
                                       (``crossval_results_folds_<folds>/postprocessing.pkl``, or ``postprocessing``
                                       given): the set's own decision, applied by ``predict`` and the cache
                                       (:mod:`medkd.workflows.nnunet_postprocessing`)

``distill``, ``predict``, ``evaluate`` and the teacher-output cache take ``OUT`` like any teacher set;
each member preprocesses with nnU-Net's plan (:mod:`medkd.data.nnunet_preprocess`). A member's
``val_dice`` is the fold's ``validation/summary.json`` foreground mean Dice when nnU-Net wrote one.

Everything is read and checked before anything is written; the set is built in a temporary folder
beside ``OUT`` and renamed into place, so a failure leaves nothing behind. A non-empty ``OUT`` is
refused unless ``force``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from medkd.data.nnunet_plans import NnunetConfiguration, NnunetPlansError, read_nnunet_configuration
from medkd.data.preprocess import PreprocessingPlan
from medkd.models.nnunet import NnunetArchitectureError, build_nnunet_network
from medkd.models.registry import ModelSpec
from medkd.engine.postprocess import POSTPROCESSING_FILE, write_postprocessing
from medkd.storage import load_weights_only, save_checkpoint
from medkd.teachers.manifest import TeacherMember, TeacherSet, file_sha256
from medkd.workflows.nnunet_postprocessing import find_nnunet_postprocessing, nnunet_postprocessing_record, \
    read_nnunet_steps

__all__ = ["import_nnunet", "read_fold"]

CHECKPOINT_NAME = "checkpoint_final.pth"


def _plan(config: NnunetConfiguration) -> PreprocessingPlan:
    pre = config.preprocessing
    ct = [None if s != "CTNormalization" else {"lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
                                                "mean": stats["mean"], "std": stats["std"]}
          for s, stats in zip(pre["normalization"], pre["intensity"])]
    return PreprocessingPlan(mode=config.mode, normalization=list(pre["normalization"]), ct_stats=ct,
                             target_spacing=list(pre["spacing"]), crop_nonzero=True,
                             num_channels=config.num_channels, nnunet=pre)


def _network(config: NnunetConfiguration, plans_path: Path) -> nn.Module:
    arch = config.architecture
    try:
        return build_nnunet_network(arch["network_class_name"], arch["arch_kwargs"], arch["kw_requires_import"],
                                    config.num_channels, len(config.labels))
    except NnunetArchitectureError as err:
        raise NnunetArchitectureError(f"{plans_path}: configurations.{config.name}.architecture.{err}") from None


def _validation_dice(fold_dir: Path) -> float | None:
    summary = fold_dir / "validation" / "summary.json"
    try:
        value = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def read_fold(results_dir: Path, config: NnunetConfiguration, fold: int | str,
              checkpoint_name: str = CHECKPOINT_NAME) -> dict[str, Any]:
    """The medkd checkpoint state of one fold (module docstring), checked: weights fit the plans' network."""
    fold_dir = results_dir / f"fold_{fold}"
    path = fold_dir / checkpoint_name
    if not path.is_file():
        raise NnunetPlansError(f"{path}: fold {fold} not found (folds present: "
                               f"{', '.join(sorted(p.name for p in results_dir.glob('fold_*'))) or 'none'})")
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnunetPlansError(f"{path}: key 'network_weights' is missing (not an nnU-Net v2 checkpoint)")
    trained = (checkpoint.get("init_args") or {}).get("configuration")
    if trained is not None and trained != config.name:
        raise NnunetPlansError(f"{path}: init_args.configuration is {trained!r}, not the requested {config.name!r}")
    network = _network(config, results_dir / "plans.json")
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[:2])
        raise NnunetPlansError(f"{path}: network_weights do not fit the network of plans.json configuration "
                               f"{config.name!r}: {detail}") from None
    spec = ModelSpec(name="nnunet", spatial_dims=len(config.patch_size), in_channels=config.num_channels,
                     out_channels=len(config.labels), kwargs=config.architecture)
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return {
        "model_spec": spec.to_dict(), "state_dict": network.state_dict(),
        "preprocessing": {"plan": _plan(config).to_dict(), "patch_size": list(config.patch_size)},
        "labels": dict(config.labels), "step": int(checkpoint.get("current_epoch") or 0), "best_metric": -1.0,
        "config": {"data": {"mode": config.mode, "patch_size": list(config.patch_size)}},
        "mirror_axes": None if axes is None else [int(a) for a in axes],
        "nnunet": {"results_dir": str(results_dir.resolve()), "configuration": config.name, "fold": str(fold),
                   "trainer": str(checkpoint.get("trainer_name")), "checkpoint": checkpoint_name,
                   "checkpoint_sha256": file_sha256(path), "val_dice": _validation_dice(fold_dir)},
    }


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir}: folder is not empty; pass --force to replace it or choose another")


def _write_set(states: dict[str, dict[str, Any]], config: NnunetConfiguration, results_dir: Path,
               folder: Path, postprocessing: dict[str, Any] | None) -> None:
    members = []
    for name, state in states.items():
        checkpoint = folder / "members" / name / "best.pt"
        save_checkpoint(state, checkpoint)
        info = {k: v for k, v in state["nnunet"].items() if k != "val_dice"}
        members.append(TeacherMember(name=name, checkpoint=checkpoint, val_dice=state["nnunet"]["val_dice"],
                                     model="nnunet", info=info))
    (folder / "nnunet").mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(results_dir / name, folder / "nnunet" / name)
    manifest = TeacherSet(kind="nnunet", members=members, labels=dict(config.labels), source=folder).save(folder)
    if postprocessing is not None:
        write_postprocessing(manifest.parent / POSTPROCESSING_FILE, postprocessing)


def _postprocessing(results_dir: Path, folds: Sequence[int | str], given: Path | None, find: bool,
                    config: NnunetConfiguration, states: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The set's decision record from nnU-Net's post-processing file (given, or found for ``folds``), made and
    checked against the labels before anything is written; members keyed as the written set's will be."""
    path = given if given is not None else find_nnunet_postprocessing(results_dir, folds) if find else None
    if path is None:
        return None
    members = [[name, "best.pt", state["step"]] for name, state in states.items()]
    return nnunet_postprocessing_record(read_nnunet_steps(path), config.labels, members, path)


def import_nnunet(results_dir: str | Path, configuration: str, folds: Sequence[int | str], out_dir: str | Path, *,
                  force: bool = False, checkpoint_name: str = CHECKPOINT_NAME, postprocessing: str | Path | None = None,
                  find_postprocessing: bool = True) -> TeacherSet:
    """Import folds ``folds`` of configuration ``configuration`` of an nnU-Net v2 results folder as a
    teacher set in ``out_dir`` (module docstring); returns the set as read back from ``out_dir``.

    ``postprocessing``: nnU-Net's ``postprocessing.pkl`` / ``.json`` to import as the set's decision; by
    default the one of ``crossval_results_folds_<folds>`` is used when present (``find_postprocessing=False``:
    none)."""
    from medkd.teachers.manifest import load_manifest

    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not folds:
        raise ValueError("give at least one fold (e.g. --folds 0,1,2,3,4)")
    if len(set(map(str, folds))) != len(folds):
        raise ValueError(f"folds {list(folds)} name a fold more than once")
    _check_output(out_dir, force)
    config = read_nnunet_configuration(results_dir, configuration)
    states = {f"fold_{fold}": read_fold(results_dir, config, fold, checkpoint_name) for fold in folds}
    pp = _postprocessing(results_dir, folds, None if postprocessing is None else Path(postprocessing),
                         find_postprocessing, config, states)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp_{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_set(states, config, results_dir, staging, pp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_manifest(out_dir)
