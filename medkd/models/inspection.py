"""Inspection of a registry model (``medkd inspect-model NAME``): its tappable modules and stages as a table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medkd.models.stages import dummy_shape, pick_stages
from medkd.models.tracing import call_rows, trace

if TYPE_CHECKING:  # rich is imported lazily: only the CLI needs it
    from rich.table import Table

__all__ = ["format_tappable", "inspect_model"]


def inspect_model(
    name: str,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 4,
    preset: str = "teacher",
    input_size: int | Sequence[int] | None = None,
) -> tuple[list[dict], dict[str, list[str]]]:
    """Build registry model ``name`` and return ``(list_tappable rows, discover_stages result)``.

    ``name`` may also be a medkd checkpoint file (``best.pt``, e.g. a fold of an imported nnU-Net
    teacher): its network is inspected, with its own dimensions and channels (the other arguments but
    ``input_size`` are ignored). Backs the ``medkd inspect-model NAME`` command; render with
    ``format_tappable(rows, stages)``.
    """
    from medkd.models.registry import create, create_from_spec

    if Path(name).is_file():
        from medkd.storage import load_checkpoint

        spec = load_checkpoint(name)["model_spec"]
        model = create_from_spec(spec)
        spatial_dims, in_channels = int(spec["spatial_dims"]), int(spec["in_channels"])
    else:
        model = create(name, spatial_dims, in_channels, out_channels, preset=preset)
    shape = dummy_shape(spatial_dims, in_channels, input_size)
    calls, x, output = trace(model, shape)
    rows = call_rows(calls)
    return rows, pick_stages(calls, x, output)


def _format_stride(stride: Sequence[int | float] | None) -> str:
    if stride is None:
        return "-"
    parts = [str(s) for s in stride]
    return parts[0] if len(set(parts)) == 1 else "x".join(parts)


def format_tappable(rows: Sequence[dict], stages: dict[str, list[str]] | None = None) -> Table:
    """A :class:`rich.table.Table` of :func:`list_tappable` rows.

    Args:
        rows: rows from :func:`list_tappable` / :func:`inspect_model`.
        stages: optional :func:`discover_stages` result; adds a ``stage`` column such as
            ``encoder[0]``, ``bottleneck`` or ``decoder[2]`` and highlights those rows.
    """
    from rich.table import Table

    labels: dict[str, str] = {}
    for kind, names in (stages or {}).items():
        for i, n in enumerate(names):
            labels[n] = kind if kind == "bottleneck" else f"{kind}[{i}]"
    table = Table(title="Tappable modules (execution order)")
    table.add_column("#", justify="right", style="dim")
    table.add_column("name", overflow="fold")
    table.add_column("type")
    table.add_column("channels", justify="right")
    table.add_column("shape")
    table.add_column("stride", justify="right")
    if stages is not None:
        table.add_column("stage")
    for i, row in enumerate(rows):
        cells = [
            str(i),
            row["name"],
            row["type"],
            "-" if row.get("channels") is None else str(row["channels"]),
            "x".join(str(s) for s in row["shape"]),
            _format_stride(row.get("stride")),
        ]
        if stages is not None:
            cells.append(labels.get(row["name"], ""))
        table.add_row(*cells, style="bold" if row["name"] in labels else None)
    return table
