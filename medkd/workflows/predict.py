"""Segment a folder of images (``medkd predict``) with a checkpoint or a whole teacher set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medkd.engine.ensemble import load_predictor
from medkd.engine.inference import predict_folder


def input_folder(path: Path, split: str = "test") -> Path:
    """A dataset folder means its imagesTs (or imagesTr with ``split="train"``); else the folder itself."""
    if (path / "dataset.json").is_file():
        return path / ("imagesTr" if split == "train" else "imagesTs")
    return path


def predict(checkpoint: Path, input: Path, output: Path, *, split: str = "test", tta: bool = False,
            whole_slice: bool | None = None, postprocess: bool = True, combine: str = "mean_prob",
            uncertainty: bool = False, save_probabilities: bool = False, device: str = "cpu",
            overwrite: bool = False, progress: Callable | None = None) -> tuple[int, list[Path]]:
    """Segment every case of ``input`` (see :func:`input_folder`) into ``output``, keeping format and geometry.

    ``checkpoint`` is a run's ``best.pt``/``last.pt`` or a teacher set (``teachers.json`` or its folder),
    which predicts as one model; ``device`` ``cuda...`` also turns on mixed precision. Returns the number
    of combined members (1 for a checkpoint) and the written segmentations.
    """
    predictor = load_predictor(checkpoint, device=device, tta=tta, amp=device.startswith("cuda"), combine=combine,
                               whole_slice=whole_slice, postprocess=postprocess)
    written = predict_folder(predictor, input_folder(input, split), output, save_probs=save_probabilities,
                             uncertainty=uncertainty, overwrite=overwrite, progress=progress)
    return predictor.num_members, written
