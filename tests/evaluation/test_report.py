"""Tests for medkd.evaluation.report: comparison tables and atomic writers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from medkd.evaluation.report import comparison_table, format_value, write_csv, write_json


def _render(table) -> str:
    console = Console(width=120, record=True)
    console.print(table)
    return console.export_text()


def test_comparison_table_formats_and_marks_missing() -> None:
    rows = [
        {"model": "teacher", "dice": 0.91234, "params": 31_000_000},
        {"model": "student", "dice": math.nan, "params": None},
        {"model": "kd"},
    ]
    columns = [("model", "Model", ""), ("dice", "Dice", ".3f"), ("params", "Params", ",d")]
    table = comparison_table(rows, columns, "Models")
    assert table.title == "Models"
    assert [c.header for c in table.columns] == ["Model", "Dice", "Params"]
    assert table.row_count == 3
    assert list(table.columns[1].cells) == ["0.912", "-", "-"]
    assert list(table.columns[2].cells) == ["31,000,000", "-", "-"]
    assert table.columns[0].justify == "left" and table.columns[1].justify == "right"
    text = _render(table)
    assert "teacher" in text and "0.912" in text


def test_comparison_table_bad_format_names_column() -> None:
    with pytest.raises(ValueError, match="'params'"):
        comparison_table([{"params": 0.5}], [("params", "Params", ",d")], "t")
    with pytest.raises(ValueError, match="column"):
        comparison_table([], [], "t")


def test_format_value() -> None:
    assert format_value(3, ".2f") == "3.00"
    assert format_value("x", "") == "x"
    assert format_value(None, ".2f") == "-"


def test_write_csv_roundtrip_and_union_of_keys(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": 0.1}, {"a": 2, "c": "x"}]
    path = write_csv(rows, tmp_path / "sub" / "t.csv")
    assert path == tmp_path / "sub" / "t.csv"
    with path.open(newline="") as handle:
        back = list(csv.DictReader(handle))
    assert back == [{"a": "1", "b": "0.1", "c": ""}, {"a": "2", "b": "", "c": "x"}]
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary left behind


def test_write_csv_fieldnames_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("old content\n")
    write_csv([], path, fieldnames=["x", "y"])
    assert path.read_text().strip() == "x,y"
    with pytest.raises(ValueError, match="t.csv"):
        write_csv([{"x": 1, "z": 2}], path, fieldnames=["x", "y"])
    assert path.read_text().strip() == "x,y"  # failed write leaves the old file


def test_write_json_is_strict(tmp_path: Path) -> None:
    path = write_json({"a": math.nan, "b": [1.5, math.inf]}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_comparison_table_shows_brackets_literally() -> None:
    table = comparison_table([{"name": "feature[encoder]", "case": "[bold]x"}],
                             [("name", "name", "s"), ("case", "case", "s")], title="t")
    text = _render(table)
    assert "feature[encoder]" in text and "[bold]x" in text
