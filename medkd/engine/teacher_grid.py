"""Teacher outputs on the student's grid when teacher and student preprocess differently.

An imported nnU-Net teacher preprocesses with nnU-Net's plan (axis transpose, its own spacing and
normalisation); a student may keep medkd's own preprocessing (``data.preprocessing_from: null``).
The two grids then differ, so the teacher cannot run on the student's input. For cached logit
targets :class:`MappedTeacherOutputs` runs each teacher as ``medkd predict`` does, from the case's
raw files through its own preprocessing to probabilities on the original grid, and puts those onto
the student's preprocessed grid with the student's crop and resampling
(:func:`medkd.data.preprocess.to_preprocessed_grid`); the target logits are ``log p``. Recipes that
run the teacher live on the student's patches (feature terms) need one grid: :func:`mapped_members`
says which teachers would need mapping so the Distiller can refuse them with the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medkd.data.preprocess import PreprocessedCase, PreprocessingPlan, to_preprocessed_grid
from medkd.engine.inference import Predictor, read_case

__all__ = ["MappedTeacherOutputs", "case_image_files", "mapped_members"]

_TINY = np.finfo(np.float32).tiny


def mapped_members(states: Sequence[dict[str, Any]], plan: PreprocessingPlan) -> list[bool]:
    """Per teacher: whether it preprocesses with nnU-Net's plan and that plan is not the student's ``plan``.

    (A medkd teacher has always run on the student's grid, whatever its own plan; that stays so.)
    """
    student = plan.to_dict()
    return [bool(s["preprocessing"]["plan"].get("nnunet")) and s["preprocessing"]["plan"] != student for s in states]


def case_image_files(case: PreprocessedCase, num_channels: int) -> list[Path]:
    """The raw channel files a preprocessed case was made from (its sidecar's ``source``, images first)."""
    source = case.properties.get("source") or []
    if len(source) < num_channels:
        raise ValueError(f"case {case.case_id}: its preprocessing record names {len(source)} source file(s), "
                         f"{num_channels} channel(s) expected; delete the preprocessing cache and run again")
    return [Path(row[0]) for row in source[:num_channels]]


class MappedTeacherOutputs:
    """``outputs(case)`` -> member log-probabilities ``(M, K, z, y, x)`` float32 on ``case``'s preprocessed grid.

    Args:
        checkpoints: the teachers' checkpoints, in member order.
        num_channels: input channels of a case.
        device: where the teachers run.
    """

    def __init__(self, checkpoints: Sequence[Path], num_channels: int, device: str | torch.device = "cpu"):
        self.predictors = [Predictor(c, device=str(device), postprocess=False) for c in checkpoints]
        self.num_channels = num_channels

    def __call__(self, case: PreprocessedCase) -> torch.Tensor:
        image, geometry = read_case(case_image_files(case, self.num_channels))
        members = []
        for predictor in self.predictors:
            try:
                probabilities = predictor.predict_arrays(image, geometry)
            except ValueError as err:
                raise ValueError(f"teacher {predictor.checkpoint} on case {case.case_id}: {err}") from None
            on_student = to_preprocessed_grid(probabilities, case.properties)
            members.append(np.log(np.maximum(on_student, _TINY)))
        return torch.from_numpy(np.stack(members).astype(np.float32))
