"""README tables generated from study results: ``medkd report --save-results`` and ``--readme/--block``.

``save_results(study_dir, dest)`` copies what a README block is generated from into a folder small
enough to commit (``benchmarks/results/<study>/``): ``study.yaml``, ``summary.csv``, ``runs.csv``,
``report.md``, ``report/*.png`` of at most :data:`MAX_FIGURE_BYTES` each (never checkpoints or
predictions), and ``provenance.json`` (:func:`provenance`).

``update_block(markdown, name, study_dir)`` replaces what lies between the lines
``<!-- medkd-report NAME -->`` and ``<!-- /medkd-report NAME -->`` of a Markdown file with
:func:`readme_block`: one provenance line (study file, date, seeds, budgets) and the summary table of
``report.md`` (the same template). Markers missing, repeated or out of order are a
:class:`~medkd.config.ConfigError` naming the file, and nothing is written; the file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medkd.config import ConfigError
from medkd.storage import atomic_write_bytes, atomic_write_text

MAX_FIGURE_BYTES = 200_000
COPIED = ("study.yaml", "summary.csv", "runs.csv", "report.md")


def _budget_text(budget: dict[str, Any]) -> str:
    parts = ([f"{budget['steps']} steps"] if budget.get("steps") else [])
    parts += [f"{budget['minutes']:g} min"] if budget.get("minutes") else []
    return " or ".join(parts)


def provenance(study_dir: str | Path) -> dict[str, Any]:
    """``study_file``, ``finished`` (UTC date), ``seeds`` and ``budgets`` of a study folder.

    A saved results folder has them in ``provenance.json``. A study folder: the study file is the
    ``.yaml`` beside it of the same name (as ``medkd experiment`` names its folder; relative to the
    current folder when below it), the date that of its newest evaluation (``eval/*/run.json``).
    """
    study_dir = Path(study_dir)
    stored = study_dir / "provenance.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    study = _study(study_dir)
    evaluations = list(study_dir.glob("eval/*/run.json"))
    if not evaluations:
        raise ConfigError(f"{study_dir}: no eval/*/run.json and no provenance.json: is it a finished study folder "
                          "(or one saved with `medkd report --save-results`)?")
    finished = datetime.fromtimestamp(max(p.stat().st_mtime for p in evaluations), timezone.utc)
    source = study_dir.resolve().with_suffix(".yaml")
    if source.is_file():
        relative = os.path.relpath(source)
        study_file = relative if not relative.startswith("..") else source.name
    else:
        study_file = f"{study.get('name', study_dir.name)} (study file not beside {study_dir.name}/)"
    return {"study_file": study_file, "finished": finished.date().isoformat(), "seeds": study.get("seeds", []),
            "budgets": [_budget_text(b) for b in study.get("budgets", [])]}


def _study(study_dir: Path) -> dict[str, Any]:
    path = study_dir / "study.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {study_dir} a study folder?")
    return yaml.safe_load(path.read_text())


def _source_study(study_dir: Path) -> Path:
    """The study file as written (beside the folder, same name) when it is there, else the folder's resolved copy
    (whose paths are absolute on the machine that ran it)."""
    source = study_dir.resolve().with_suffix(".yaml")
    return source if source.is_file() else study_dir / "study.yaml"


def _without_figures(report: str, left_out: list[Path]) -> str:
    """``report.md`` with the image links of ``left_out`` figures replaced by a note (no dangling links)."""
    for figure in left_out:
        link = f"report/{figure.name}"
        note = f"*{link} ({figure.stat().st_size // 1000} kB) is left out of the saved results*"
        report = "\n".join(note if line.strip().startswith("![") and f"({link})" in line else line
                           for line in report.split("\n"))
    return report


def save_results(study_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy a finished study's README material into ``dest`` (see the module doc); return the files written.

    Figures over :data:`MAX_FIGURE_BYTES` are left out, and their links in the copied ``report.md`` become a
    note saying so. ``study.yaml`` is the study file as written when it lies beside the folder.
    """
    study_dir, dest = Path(study_dir), Path(dest)
    missing = [name for name in COPIED if not (study_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{study_dir}: {', '.join(missing)} missing: run `medkd report {study_dir}` on a finished "
                          "study folder first")
    record = provenance(study_dir)
    figures = sorted((study_dir / "report").glob("*.png"))
    left_out = [f for f in figures if f.stat().st_size > MAX_FIGURE_BYTES]
    sources = {name: study_dir / name for name in COPIED} | {f"report/{f.name}": f for f in figures if f not in left_out}
    sources["study.yaml"] = _source_study(study_dir)
    written = []
    for name, path in sources.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        if name == "report.md":
            data = _without_figures(data.decode(), left_out).encode()
        atomic_write_bytes(target, data)
        written.append(target)
    atomic_write_text(dest / "provenance.json", json.dumps(record, indent=1) + "\n")
    return written + [dest / "provenance.json"]


def regenerate_command(markdown: str | Path, name: str, study_dir: str | Path) -> str:
    """The command that regenerates block ``name``, run from the Markdown file's folder (paths relative to it)."""
    folder = os.path.relpath(Path(study_dir).resolve(), Path(markdown).resolve().parent)
    return f"medkd report {folder} --readme {Path(markdown).name} --block {name}"


def readme_block(study_dir: str | Path, command: str) -> str:
    """Provenance line and summary table of ``study_dir`` (a study or saved results folder), as Markdown.

    ``command`` is the command that regenerates the block (:func:`regenerate_command`), quoted in the line.
    """
    import csv

    from jinja2 import Environment, FileSystemLoader

    from medkd.workflows.study_report import TEMPLATES, table_rows

    study_dir = Path(study_dir)
    record = provenance(study_dir)
    if not (study_dir / "summary.csv").is_file():
        raise ConfigError(f"{study_dir / 'summary.csv'} not found: is {study_dir} a finished study folder?")
    with open(study_dir / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    seeds = ", ".join(str(s) for s in record["seeds"])
    line = (f"*Generated by `{command}` from `{record['study_file']}`, run finished {record['finished']}; "
            f"seeds {seeds}; budgets: {'; '.join(record['budgets'])}.*")
    env = Environment(loader=FileSystemLoader(TEMPLATES), trim_blocks=True, lstrip_blocks=True)
    table = env.get_template("summary_table.md.j2").render(table=table_rows(summary))
    return f"{line}\n\n{table.rstrip()}\n"


def replace_block(text: str, name: str, block: str, source: str = "<markdown>") -> str:
    """``text`` with the lines between its ``medkd-report name`` markers replaced by ``block``.

    Raises :class:`ConfigError` naming ``source`` when a marker is missing, repeated or the end comes first.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--block {name!r}: use letters, digits, '_', '-', '.'")
    start, end = f"<!-- medkd-report {name} -->", f"<!-- /medkd-report {name} -->"
    lines = text.split("\n")
    found = {marker: [i for i, line in enumerate(lines) if line.strip() == marker] for marker in (start, end)}
    for marker, where in found.items():
        if len(where) != 1:
            raise ConfigError(f"{source}: {'no' if not where else len(where)} line(s) `{marker}`; need exactly one "
                              f"`{start}` followed by one `{end}`")
    first, last = found[start][0], found[end][0]
    if last < first:
        raise ConfigError(f"{source}: `{end}` comes before `{start}`")
    return "\n".join(lines[: first + 1] + block.rstrip("\n").split("\n") + lines[last:])


def update_block(markdown: str | Path, name: str, study_dir: str | Path) -> Path:
    """Replace block ``name`` of the Markdown file with :func:`readme_block` of ``study_dir`` (atomic write)."""
    markdown = Path(markdown)
    if not markdown.is_file():
        raise ConfigError(f"--readme {markdown}: no such file")
    text = markdown.read_text()
    block = readme_block(study_dir, regenerate_command(markdown, name, study_dir))
    new = replace_block(text, name, block, source=str(markdown))
    if new != text:
        atomic_write_text(markdown, new)
    return markdown
