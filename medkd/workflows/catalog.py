"""What medkd ships, as tables: distillation recipes (``medkd recipes``) and registry models (``medkd models``)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from medkd.evaluation.report import comparison_table
from medkd.models import count_parameters, create, list_models
from medkd.recipes import list_recipes, load_recipe


def recipe_rows() -> list[dict[str, Any]]:
    """One row per shipped recipe: name, terms x weight, teacher outputs, combination, data, paper."""
    rows = []
    for name in list_recipes():
        r = load_recipe(name)
        terms = [f"{r.supervised.loss} x{r.supervised.weight:g}"]
        terms += [f"{t.loss}{'[' + (t.taps or 'custom') + ']' if t.uses_features else ''} x{t.weight:g}"
                  for t in r.terms.values()]
        rows.append({"name": name, "terms": " + ".join(terms),
                     "teacher": "cached" if r.uses_cache else ("live (features)" if r.needs_teacher_features
                                                                else "live"),
                     "combine": r.teachers.combine + (" x val Dice" if r.teachers.member_weights == "val_dice" else ""),
                     "data": f"{r.data.data_fraction:.0%} of cases" if r.data.data_fraction else "all cases",
                     "paper": r.paper})
    return rows


def recipes_table() -> Table:
    """The shipped distillation recipes with their terms and weights."""
    return comparison_table(recipe_rows(), [("name", "recipe", "s"), ("terms", "terms x weight", "s"),
                                            ("teacher", "teacher outputs", "s"),
                                            ("combine", "several teachers", "s"), ("data", "data", "s"),
                                            ("paper", "paper", "s")], title="medkd distillation recipes")


def model_rows(dims: int = 2) -> list[dict[str, Any]]:
    """One row per registry model: teacher and student parameter counts (1 channel in, 4 classes) and their ratio."""
    rows = []
    for name in list_models():
        counts = {p: count_parameters(create(name, dims, 1, 4, preset=p)) for p in ("teacher", "student")}
        rows.append({"name": name, "teacher": counts["teacher"], "student": counts["student"],
                     "ratio": counts["teacher"] / counts["student"]})
    return rows


def models_table(dims: int = 2) -> Table:
    """The registry's architectures with teacher/student parameter counts."""
    return comparison_table(model_rows(dims), [("name", "model", "s"), ("teacher", "teacher params", ",d"),
                                               ("student", "student params", ",d"), ("ratio", "ratio", ".1f")],
                            title=f"medkd models ({dims}D, 1 channel in, 4 classes)")
