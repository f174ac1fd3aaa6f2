"""Validation on preprocessed cases (the grid the network sees): Dice during training, and the
post-processing decision at the end of a run (:mod:`medkd.engine.postprocess`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn

from medkd.config import ConfigError, RunConfig, load_config
from medkd.data.dataset import load_dataset
from medkd.data.io import read_image
from medkd.data.preprocess import PreprocessedCase, PreprocessingPlan
from medkd.data.store import PreprocessedStore
from medkd.engine.data_setup import split_case_ids
from medkd.engine.ensemble import EnsemblePredictor, set_postprocessing_path
from medkd.engine.inference import Predictor, predict_probabilities, segmentation
from medkd.engine.postprocess import POSTPROCESSING_FILE, decide_postprocessing, write_postprocessing
from medkd.storage import load_checkpoint
from medkd.teachers.manifest import TeacherSet, is_manifest


def case_bar(cases: Sequence[Any], description: str, enabled: bool) -> Any:
    """``cases``, behind a transient tqdm bar naming the work when ``enabled``."""
    if not enabled:
        return cases
    from tqdm.auto import tqdm

    return tqdm(cases, desc=description, unit="case", leave=False, mininterval=1.0)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Foreground Dice per class for label maps (*spatial); NaN where the class is absent from both."""
    pred_1h = one_hot(pred[None, None].long(), num_classes)
    label_1h = one_hot(label[None, None].long(), num_classes)
    dice = compute_dice(pred_1h, label_1h, include_background=False, ignore_empty=False)[0].numpy()
    absent = (label_1h.sum(dim=tuple(range(2, label_1h.ndim)))[0, 1:] == 0) & (
        pred_1h.sum(dim=tuple(range(2, pred_1h.ndim)))[0, 1:] == 0)
    dice[absent.numpy()] = np.nan
    return dice


def validate(model: nn.Module, cases: Sequence[PreprocessedCase], *, mode: str, patch_size: Sequence[int],
             num_classes: int, device: torch.device | str = "cpu", amp: bool = False,
             whole_slice: bool = False, progress: bool = False) -> np.ndarray:
    """Mean Dice per foreground class over ``cases`` (NaN-aware). Restores the model's train mode.

    2D mode slides a window of ``patch_size`` over each slice, or predicts whole slices with ``whole_slice``.
    ``progress`` shows a (transient) bar of the cases.
    """
    was_training = model.training
    scores = []
    for case in case_bar(cases, f"validate on {len(cases)} case(s)", progress):
        probs = predict_probabilities(model, case.load_image(), mode=mode, patch_size=patch_size,
                                      device=device, amp=amp, whole_slice=whole_slice)
        label = torch.from_numpy(np.array(case.load_label()[0]))
        scores.append(dice_per_class(probs.argmax(0), label, num_classes))
    model.train(was_training)
    if not scores:
        return np.full(num_classes - 1, np.nan)
    with warnings.catch_warnings():  # a class absent from every case stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(scores), axis=0)


def decide_run_postprocessing(checkpoint: str | Path, cases: Sequence[PreprocessedCase], *,
                              device: torch.device | str = "cpu", output: str | Path | None = None,
                              whole_slice: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Decide post-processing for ``checkpoint`` on the preprocessed validation ``cases`` and write it.

    Predictions are made as in validation (the run's mode, patch size and whole-slice setting,
    unless ``whole_slice`` says otherwise; no TTA) on the preprocessed grid. The record of
    :func:`~medkd.engine.postprocess.decide_postprocessing`, plus ``checkpoint`` (file name),
    ``step``, ``mode``, ``whole_slice`` and ``cases`` (ids), is written atomically to ``output``
    (default: ``postprocessing.json`` beside the checkpoint) and returned.
    """
    device = torch.device(device)
    predictor = Predictor(checkpoint, device=str(device), amp=device.type == "cuda", whole_slice=whole_slice,
                          postprocess=False)
    predictions, references = [], []
    for case in case_bar(cases, f"post-processing: predict {len(cases)} validation case(s)", progress):
        probs = predict_probabilities(predictor.model, case.load_image(), mode=predictor.plan.mode,
                                      patch_size=predictor.patch_size, device=device, amp=predictor.amp,
                                      whole_slice=predictor.whole_slice)
        predictions.append(segmentation(probs.numpy()))
        references.append(np.asarray(case.load_label()[0]))
    record = {"checkpoint": predictor.checkpoint.name, "step": predictor.step, "mode": predictor.plan.mode,
              "whole_slice": predictor.whole_slice, "cases": [case.case_id for case in cases],
              **decide_postprocessing(predictions, references, predictor.labels)}
    write_postprocessing(output or predictor.checkpoint.parent / POSTPROCESSING_FILE, record)
    return record


def run_validation_cases(config: RunConfig, checkpoint: str | Path,
                         cache_root: str | Path | None = None) -> list[PreprocessedCase]:
    """The validation cases of the run described by ``config``, preprocessed with ``checkpoint``'s
    plan (from the preprocessed-case cache, ``cache_root`` or the run's ``data.cache_dir``, when
    they are there)."""
    if config.data.dataset is None:
        raise ConfigError("data.dataset is not set in the run's config; cannot find its validation cases")
    dataset = load_dataset(config.data.dataset)
    _, val_ids = split_case_ids(config.data, dataset, seed=config.train.seed)
    plan = PreprocessingPlan.from_dict(load_checkpoint(checkpoint)["preprocessing"]["plan"])
    store = PreprocessedStore(dataset, plan, cache_root or config.data.cache_dir)
    return store.ensure([dataset.case(i) for i in val_ids], num_workers=max(1, config.data.num_workers))


def decide_set_postprocessing(teachers: TeacherSet | str | Path, *, device: str = "cpu",
                              progress: bool | None = None) -> dict[str, Any]:
    """Decide a teacher set's own post-processing on its combined predictions and write it beside the manifest.

    The validation cases are those of the first member's run (``config.yaml`` beside its checkpoint),
    predicted from the raw files as ``medkd predict`` does (original grid, no TTA). The record names
    the members (``[name, checkpoint file, step]``) it was decided for; an :class:`EnsemblePredictor`
    applies it only to those. ``progress`` (default: the member run's ``train.progress``) shows a bar of the cases.
    """
    predictor = EnsemblePredictor(teachers, device=device, postprocess=False)
    run_config = predictor.teachers.members[0].checkpoint.parent / "config.yaml"
    if not run_config.is_file():
        raise ValueError(f"{run_config} is missing: the set's post-processing is decided on the validation cases "
                         "of its first member's run (an imported nnU-Net set carries nnU-Net's own decision: "
                         "medkd import-nnunet --postprocessing FILE)")
    config = load_config(run_config)
    dataset = load_dataset(config.data.dataset)
    _, val_ids = split_case_ids(config.data, dataset, seed=config.train.seed)
    predictions, references = [], []
    bar = f"post-processing of the set: predict {len(val_ids)} validation case(s)"
    for case in case_bar([dataset.case(i) for i in val_ids], bar, config.train.progress if progress is None
                         else progress):
        predictions.append(predictor.predict_files(case.image_files)[0])
        references.append(read_image(case.label_file)[0])
    record = {"members": predictor.member_keys, "cases": val_ids,
              **decide_postprocessing(predictions, references, predictor.labels)}
    write_postprocessing(set_postprocessing_path(predictor.teachers), record)
    return record


def postprocess_run(run_dir: str | Path, *, device: str = "cpu", output: str | Path | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """(Re)decide the post-processing of the run in ``run_dir`` for its ``best.pt`` on its validation
    cases (``run_dir/config.yaml``); writes ``run_dir/postprocessing.json`` unless ``output`` is given.
    A teacher-set folder (holding ``teachers.json``) gets the set's decision
    (:func:`decide_set_postprocessing`; ``output`` does not apply)."""
    run_dir = Path(run_dir)
    if is_manifest(run_dir) and run_dir.is_dir():
        return decide_set_postprocessing(run_dir, device=device, progress=progress)
    checkpoint = run_dir / "best.pt"
    cases = run_validation_cases(load_config(run_dir / "config.yaml"), checkpoint)
    return decide_run_postprocessing(checkpoint, cases, device=device, output=output, progress=progress)
