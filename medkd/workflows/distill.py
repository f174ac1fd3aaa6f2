"""The config of a distillation run (``medkd distill``) from a teacher, a student and a recipe.

Precedence, lowest first: the (first) teacher's data settings (only without a config file, which
takes their place; never its ``data_fraction``; its plan, if it had one, gives the student's network), the
student and the recipe (``model.name``,
``model.preset`` = ``student``, the ``distill`` section, the recipe's ``data.data_fraction``), then the
caller's dotted-key overrides. :func:`medkd.workflows.train.train_run` runs the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medkd.config import RunConfig
from medkd.recipes import load_recipe
from medkd.storage import load_checkpoint
from medkd.teachers.manifest import open_teachers
from medkd.workflows.train import resolve_config


def distill_defaults(teacher: str | Path | None, student: str = "unet", recipe: str = "logit-kd", *,
                     teacher_data: bool = True) -> dict[str, Any]:
    """Dotted-key defaults of a distillation run (overridden by anything the caller gives).

    ``teacher`` is a checkpoint or a teacher set (``teachers.json`` or its folder); ``recipe`` a shipped
    recipe name or a YAML file. With ``teacher_data`` the data settings of the (first) teacher's run
    (dataset, mode, patch size, normalisation...) come first, except its ``data_fraction``; for an imported
    nnU-Net teacher (mode and patch size only) ``data.preprocessing_from`` is the teacher, so the student is
    trained on nnU-Net's preprocessing of the teacher (``--set data.preprocessing_from=null``: medkd's own;
    the teacher-output cache then maps the teacher's outputs onto the student's grid).
    """
    if teacher is None:
        raise ValueError("medkd distill needs --teacher (a checkpoint or a teacher set), except with --resume")
    recipe_spec = load_recipe(recipe)
    teacher_state = load_checkpoint(open_teachers(teacher).members[0].checkpoint)
    teacher_cfg = teacher_state["config"]
    data = {k: v for k, v in teacher_cfg["data"].items() if k != "data_fraction"} if teacher_data else {}
    if teacher_data and "nnunet" in teacher_state:  # an imported nnU-Net teacher: the student sees its grid
        data["preprocessing_from"] = str(teacher)
    defaults = {**{f"data.{k}": v for k, v in data.items()}, "model.name": student, "model.preset": "student",
                "distill": {"teacher": str(teacher), "recipe": recipe_spec.model_dump(mode="json")}}
    if recipe_spec.data.data_fraction is not None:
        defaults["data.data_fraction"] = recipe_spec.data.data_fraction
    if teacher_data and teacher_cfg.get("plan"):  # the student takes its network from the teacher's plan
        defaults["plan"] = teacher_cfg["plan"]
    return defaults


def distill_config(teacher: str | Path, student: str = "unet", recipe: str = "logit-kd",
                   overrides: Mapping[str, Any] | None = None, *, config: str | Path | None = None) -> RunConfig:
    """The resolved config of distilling ``teacher`` into ``student`` with ``recipe``.

    ``config`` is an optional YAML file (its data settings replace the teacher's); ``overrides``
    dotted keys (``{"train.max_steps": 100}``) that win over everything else.
    """
    defaults = distill_defaults(teacher, student, recipe, teacher_data=config is None)
    return resolve_config(config, {**defaults, **(overrides or {})})
