"""Reporting helpers: rich comparison tables and atomic CSV/JSON writers."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.table import Table
from rich.markup import escape

__all__ = ["MISSING", "comparison_table", "format_value", "write_csv", "write_json"]

#: Cell text for a missing value (absent key, ``None`` or NaN).
MISSING = "-"
_TEXT_SPECS = ("", "s")


def _is_missing(value: Any) -> bool:
    """True for ``None`` and non-finite NaN floats."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(value: Any, spec: str, key: str = "") -> str:
    """Format one cell with a format spec (``".3f"``, ``",d"``, ``""`` for plain text).

    Missing values (``None``, NaN) become :data:`MISSING`.

    Raises:
        ValueError: ``value`` does not fit ``spec`` (names the column ``key``).
    """
    if _is_missing(value):
        return MISSING
    try:
        return format(value, spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f"column {key!r}: cannot format {value!r} with format spec {spec!r}: {err}") from err


def comparison_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str) -> Table:
    """A rich table with one row per dict in ``rows``.

    Args:
        rows: the table's rows; keys not named in ``columns`` are ignored.
        columns: ``(key, header, format spec)`` per column, e.g. ``("dice", "Dice", ".3f")``;
            a spec of ``""`` or ``"s"`` shows the value as text (left-aligned), any other
            spec is right-aligned. Absent keys, ``None`` and NaN show as ``"-"``.
        title: the table's title.

    Raises:
        ValueError: no columns, or a value that does not fit its column's format spec.
    """
    if not columns:
        raise ValueError("comparison_table needs at least one column")
    table = Table(title=title)
    for _key, header, spec in columns:
        table.add_column(header, justify="left" if spec in _TEXT_SPECS else "right")
    for row in rows:
        # cells are plain text: "[encoder]" or a case id in brackets must not be read as rich markup
        table.add_row(*(escape(format_value(row.get(key), spec, key)) for key, _header, spec in columns))
    return table


@contextmanager
def _atomic_writer(path: Path) -> Iterator[IO[str]]:
    """Open a temporary file next to ``path``; on success ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(
    rows: list[dict], path: str | os.PathLike[str], *, fieldnames: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` to a CSV file atomically (temporary file + ``os.replace``).

    Args:
        rows: one dict per line.
        path: destination; parent folders are created.
        fieldnames: columns in order; default: the keys of all rows in order of first
            appearance. Keys missing from a row are written as empty cells; keys not in
            ``fieldnames`` raise ``ValueError``. Floats keep full precision, NaN is ``nan``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    fields = list(fieldnames)
    for index, row in enumerate(rows):
        extra = [key for key in row if key not in fields]
        if extra:
            raise ValueError(f"{path}: row {index} has keys {extra} that are not among the columns {fields}")
    with _atomic_writer(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if fields:
            writer.writeheader()
        writer.writerows(rows)
    return path


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by ``None`` recursively, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented strict JSON atomically; NaN and infinities become ``null``."""
    path = Path(path)
    with _atomic_writer(path) as handle:
        json.dump(_json_safe(obj), handle, indent=2, allow_nan=False)
        handle.write("\n")
    return path
