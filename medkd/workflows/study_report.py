"""``medkd report STUDY_DIR``: one self-contained ``report.html`` and a ``report.md`` of a finished study.

Read from the study folder (:mod:`medkd.workflows.experiment`): ``study.yaml``, ``summary.csv``,
``runs.csv``, ``results.csv``, the runs' ``train_log.csv`` / ``val_log.csv`` and the test predictions.
Written: ``report.html`` (figures embedded as PNG data, no network, opens from disk), ``report.md``
(the same tables; figures as links to ``report/*.png``, also written) for READMEs.

Figures (:mod:`medkd.workflows.study_plots`): per-case Dice per method (box plots, one panel per
student x budget x labels), Dice vs CPU latency with the Pareto front, training curves per panel, and
overlays (image, reference, teacher, labels-only student, best distilled student) of the best, median
and worst test case of the best distilled student of the first panel (lowest seed's predictions).
Both files come from Jinja2 templates in ``medkd/workflows/templates``.
"""

from __future__ import annotations

import base64
import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medkd.config import ConfigError
from medkd.storage import atomic_write_bytes, atomic_write_text
from medkd.workflows import study_plots
from medkd.workflows.study import LABELS_ONLY

TEMPLATES = Path(__file__).resolve().parent / "templates"
PANEL = ("student", "budget", "labels")


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {path.parent} a study folder whose `medkd experiment` has finished?")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _fmt(value: float, spec: str, plus: bool = False) -> str:
    return "-" if math.isnan(value) else format(value, ("+" if plus else "") + spec)


def table_rows(summary: list[dict[str, str]]) -> list[dict[str, str]]:
    """Summary rows as formatted report cells (text), one per teacher / student x method x budget x labels."""
    out = []
    for r in summary:
        n = _num
        ci = f" [{_fmt(n(r['test_dice_ci_low']), '.3f')}, {_fmt(n(r['test_dice_ci_high']), '.3f')}]"
        delta = "" if r["delta"] == "" else (f"{_fmt(n(r['delta']), '.3f', True)} [{_fmt(n(r['delta_ci_low']), '.3f', True)}, "
                                             f"{_fmt(n(r['delta_ci_high']), '.3f', True)}]")
        out.append({
            "student": r["student"], "budget": r["budget"], "labels": r["labels"], "method": r["method"],
            "seeds": r["seeds"], "steps": _fmt(n(r["steps"]), ".0f"), "train_min": _fmt(n(r["train_s"]) / 60, ".1f"),
            "step_rel": _fmt(n(r["step_time_rel"]), ".2f"), "params": f"{int(n(r['params'])):,}",
            "latency": _fmt(n(r["latency_ms"]), ".1f"),
            "dice": _fmt(n(r["test_dice"]), ".3f") + ("" if math.isnan(n(r["test_dice_sd"]))
                                                       else f" ± {_fmt(n(r['test_dice_sd']), '.3f')}") + ci,
            "delta": delta or "-", "wins": f"{r['wins']}/{r['n_cases']}" if r["wins"] else "-",
            "p": "-" if r["p_value"] == "" else f"{_fmt(n(r['p_value']), '.2g')} ({_fmt(n(r['p_holm']), '.2g')})",
            "gap": "-" if math.isnan(n(r["gap_closed"])) else f"{100 * n(r['gap_closed']):.0f}%",
        })
    return out


def case_dice(results: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """``{run: {case: mean foreground Dice}}`` from results.csv rows (NaN classes skipped)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in results:
        values[row["run"]][row["case"]].append(_num(row["dice"]))
    return {run: {c: float(np.nanmean(v)) for c, v in cases.items()} for run, cases in values.items()}


def _seed_mean(runs: list[dict[str, str]], per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    cases = sorted(set.intersection(*(set(per_case[r["run"]]) for r in runs)))
    return {c: float(np.mean([per_case[r["run"]][c] for r in runs])) for c in cases}


def panels(runs: list[dict[str, str]]) -> dict[tuple, dict[str, list[dict[str, str]]]]:
    """``{(student, budget, labels): {method: [runs.csv rows]}}`` in study order, each with its teacher first."""
    teachers = {r["labels"]: r for r in runs if r["role"] == "teacher"}
    out: dict[tuple, dict[str, list[dict[str, str]]]] = {}
    for row in runs:
        if row["role"] != "student":
            continue
        key = tuple(row[k] for k in PANEL)
        if key not in out:
            teacher = teachers.get(row["labels"]) or teachers.get("given")
            out[key] = {"teacher": [teacher]} if teacher else {}
        out[key].setdefault(row["method"], []).append(row)
    return out


def _title(key: tuple) -> str:
    return f"{key[0]} · {key[1]} · labels {key[2]}"


def _curves(study_dir: Path, methods: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, Any]]]:
    curves: dict[str, list[dict[str, Any]]] = {}
    for method, rows in methods.items():
        for row in rows:
            folder = study_dir / "runs" / row["run"]
            logs = {name: _rows(folder / f"{name}_log.csv") if (folder / f"{name}_log.csv").is_file() else []
                    for name in ("train", "val")}
            curves.setdefault(method, []).append({
                "seed": row["seed"], "train": [(int(r["step"]), _num(r["loss"])) for r in logs["train"]],
                "val": [(int(r["step"]), _num(r["mean_dice"])) for r in logs["val"]]})
    return curves


def _case_files(folder: Path, case: str) -> Path:
    """The image file of ``case`` in ``folder`` (``CASE<ending>``; a prediction's .npz is skipped)."""
    found = [p for p in sorted(folder.glob(f"{case}.*")) if not p.name.endswith(".npz")]
    if not found:
        raise FileNotFoundError(f"no file for case {case!r} in {folder}")
    return found[0]


def _overlay_cases(study_dir: Path, dataset: Path, methods: dict[str, list[dict[str, str]]],
                   summary: list[dict[str, str]], per_case: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Best, median and worst test case of the best distilled method of a panel, with every model's segmentation."""
    from medkd.data.io import read_image

    recipes = [m for m in methods if m not in ("teacher", LABELS_ONLY)]
    if not recipes:
        return []
    first = methods[recipes[0]][0]
    scores = {r["method"]: _num(r["test_dice"]) for r in summary
              if all(r[k] == first[k] for k in PANEL) and r["method"] in recipes}
    best = max(recipes, key=lambda m: scores.get(m, -math.inf))
    ranked = sorted(_seed_mean(methods[best], per_case).items(), key=lambda item: item[1])
    picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
    shown = [(name, min(methods[name], key=lambda r: int(r["seed"]))) for name in ("teacher", LABELS_ONLY, best)
             if name in methods]
    cases = []
    for what, (case, dice) in picks.items():
        image, _ = read_image(_case_files(dataset / "imagesTs", f"{case}_0000"))
        label, _ = read_image(_case_files(dataset / "labelsTs", case))
        predictions = [(f"{name} ({per_case[row['run']][case]:.2f})",
                        read_image(_case_files(study_dir / "eval" / row["run"] / "predictions", case))[0])
                       for name, row in shown]
        cases.append({"title": f"{what}: {case} ({best} Dice {dice:.2f})", "image": image, "label": label,
                      "predictions": predictions})
    return cases


def figures(study_dir: Path, study: dict[str, Any], summary: list[dict[str, str]], runs: list[dict[str, str]],
            results: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Every figure of the report: ``{"name", "caption", "png"}``."""
    per_case = case_dice(results)
    groups = panels(runs)
    boxes = {_title(k): {m: list(_seed_mean(rows, per_case).values()) for m, rows in methods.items()}
             for k, methods in groups.items()}
    out = [{"name": "dice_boxes", "png": study_plots.dice_boxes(boxes),
            "caption": "Dice per test case (mean over classes, then over seeds) of each method; triangles: means."}]
    points = [{**r, "label": r["method"] if r["role"] == "teacher" else f"{r['method']} ({r['budget']})"}
              for r in summary]
    out.append({"name": "dice_vs_latency", "png": study_plots.dice_vs_latency(points),
                "caption": "Mean test Dice against CPU latency per test case (whole prediction pipeline, "
                           "median); dashed: the Pareto front."})
    for index, (key, methods) in enumerate(groups.items()):
        out.append({"name": f"curves_{index}", "png": study_plots.training_curves(_curves(study_dir, methods)),
                    "caption": f"Training loss and validation Dice, {_title(key)} (one line per seed)."})
    key, methods = next(iter(groups.items()))
    cases = _overlay_cases(study_dir, Path(study["dataset"]), methods, summary, per_case)
    if cases:
        num_classes = len(yaml.safe_load((Path(study["dataset"]) / "dataset.json").read_text())["labels"])
        out.append({"name": "overlays", "png": study_plots.overlays(cases, num_classes),
                    "caption": f"Best, median and worst test case of the best distilled student, {_title(key)} "
                               "(lowest seed); per-case Dice in brackets."})
    return out


def write_report(study_dir: str | Path) -> list[Path]:
    """Write ``report.html``, ``report.md`` and ``report/*.png`` in ``study_dir``; return the paths."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise ConfigError(f"{study_dir / 'study.yaml'} not found: is {study_dir} a study folder?")
    study = yaml.safe_load((study_dir / "study.yaml").read_text())
    summary, runs = _rows(study_dir / "summary.csv"), _rows(study_dir / "runs.csv")
    figs = figures(study_dir, study, summary, runs, _rows(study_dir / "results.csv"))
    written = []
    for fig in figs:
        fig["file"] = f"report/{fig['name']}.png"
        fig["data"] = base64.b64encode(fig["png"]).decode("ascii")
        atomic_write_bytes(study_dir / fig["file"], fig["png"])
        written.append(study_dir / fig["file"])
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    context = {"name": study.get("name", study_dir.name), "table": table_rows(summary), "figures": figs,
               "study": yaml.safe_dump(study, sort_keys=False)}
    for name in ("report.html", "report.md"):
        atomic_write_text(study_dir / name, env.get_template(f"{name}.j2").render(**context))
        written.append(study_dir / name)
    return written
