"""Segment a folder of images (``medkd predict``) with a checkpoint, a whole teacher set or a bundle.

A bundle (``medkd export``) runs with onnxruntime: that path imports no PyTorch (the PyTorch
predictors are imported only when a checkpoint is given), so it works where only the deploy
dependencies are installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medkd.engine.case_io import predict_folder


def input_folder(path: Path, split: str = "test") -> Path:
    """A dataset folder means its imagesTs (or imagesTr with ``split="train"``); else the folder itself."""
    if (path / "dataset.json").is_file():
        return path / ("imagesTr" if split == "train" else "imagesTs")
    return path


def predict(checkpoint: Path | None, input: Path, output: Path, *, bundle: Path | None = None, split: str = "test",
            tta: bool = False, whole_slice: bool | None = None, postprocess: bool = True, combine: str = "mean_prob",
            uncertainty: bool = False, save_probabilities: bool = False, device: str = "cpu",
            overwrite: bool = False, progress: Callable | None = None) -> tuple[int, list[Path]]:
    """Segment every case of ``input`` (see :func:`input_folder`) into ``output``, keeping format and geometry.

    ``checkpoint`` is a run's ``best.pt``/``last.pt`` or a teacher set (``teachers.json`` or its folder),
    which predicts as one model; ``device`` ``cuda...`` also turns on mixed precision. Give ``bundle``
    instead of ``checkpoint`` to run an exported bundle with onnxruntime on the CPU. Returns the number
    of combined members (1 for a checkpoint or bundle) and the written segmentations.
    """
    if (checkpoint is None) == (bundle is None):
        raise ValueError("give one model: --checkpoint (a run's .pt or a teacher set) or --bundle (from medkd export)")
    if bundle is not None:
        if device != "cpu":
            raise ValueError(f"a bundle runs on the CPU with onnxruntime; got --device {device}")
        from medkd.deploy.runtime import BundlePredictor

        predictor = BundlePredictor(bundle, tta=tta, whole_slice=whole_slice, postprocess=postprocess)
    else:
        from medkd.engine.ensemble import load_predictor

        predictor = load_predictor(checkpoint, device=device, tta=tta, amp=device.startswith("cuda"), combine=combine,
                                   whole_slice=whole_slice, postprocess=postprocess)
    written = predict_folder(predictor, input_folder(input, split), output, save_probs=save_probabilities,
                             uncertainty=uncertainty, overwrite=overwrite, progress=progress)
    return predictor.num_members, written
