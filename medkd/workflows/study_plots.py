"""The figures of a study report (matplotlib, Agg backend): each function returns PNG bytes.

* :func:`dice_boxes`: per-case Dice of each method (seed-averaged), one panel per comparison group;
* :func:`dice_vs_latency`: mean test Dice against CPU latency per case, the Pareto front marked (no
  other model is both faster and better);
* :func:`training_curves`: training loss and validation Dice against steps, one colour per method;
* :func:`overlays`: image, reference and predictions of the same case for a few cases.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def dice_boxes(groups: Mapping[str, Mapping[str, Sequence[float]]]) -> bytes:
    """``{panel title: {method: per-case Dice}}`` as box plots (cases as dots), one panel per group."""
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 2.0 + 1.3 * max(len(m) for m in groups.values()))
                                                       * len(groups), 3.8), squeeze=False)
    for ax, (title, methods) in zip(axes[0], groups.items()):
        names = list(methods)
        ax.boxplot([list(methods[n]) for n in names], showmeans=True)
        for i, name in enumerate(names, 1):
            values = np.asarray(methods[name], dtype=float)
            jitter = np.random.default_rng(i).uniform(-0.12, 0.12, values.size)
            ax.scatter(np.full(values.size, i) + jitter, values, s=8, alpha=0.5, color="tab:gray")
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
        ax.set_ylabel("Dice per test case (mean over classes and seeds)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(latency, dice)`` points no other point beats on both (faster and at least as good)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def dice_vs_latency(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Mean test Dice against latency (ms per case) of each summary row (``label``, ``latency_ms``, ``test_dice``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [(float(r["latency_ms"]), float(r["test_dice"])) for r in rows]
    for (x, y), row in zip(points, rows):
        ax.scatter(x, y, s=30, color="tab:red" if row.get("role") == "teacher" else "tab:blue")
        ax.annotate(row["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--o", color="tab:green", ms=11,
            mfc="none", label="Pareto front (no other model is both faster and better)")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency per test case (ms, log scale)")
    ax.set_ylabel("mean test Dice")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def training_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """``{method: [{"seed", "train": [(step, loss)], "val": [(step, dice)]}]}``: loss and val Dice panels."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = plt.get_cmap("tab10")
    for index, (method, runs) in enumerate(curves.items()):
        for n, run in enumerate(runs):
            label = method if n == 0 else None
            if run["train"]:
                loss_ax.plot(*zip(*run["train"]), color=colours(index % 10), alpha=0.8, lw=1, label=label)
            if run["val"]:
                val_ax.plot(*zip(*run["val"]), "o-", color=colours(index % 10), alpha=0.8, ms=3, lw=1, label=label)
    loss_ax.set(xlabel="step", ylabel="training loss (total)", yscale="log", title="training loss")
    val_ax.set(xlabel="step", ylabel="validation Dice", title="validation Dice")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _middle_slice(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A 2D view: the image itself, or a 3D volume's slice (first axis) with the most foreground."""
    if label.ndim == 2:
        return image, label, None
    index = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(axis=1)))
    return image[index], label[index], index


def overlays(cases: Sequence[Mapping[str, Any]], num_classes: int) -> bytes:
    """One row per case (``title``, ``image``, ``label``, ``predictions``: [(name, seg)]), one column per map."""
    columns = 2 + max(len(c["predictions"]) for c in cases)
    fig, axes = plt.subplots(len(cases), columns, figsize=(2.3 * columns, 2.4 * len(cases)), squeeze=False)
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: max(num_classes - 1, 1)])
    for row, case in zip(axes, cases):
        image, label, index = _middle_slice(np.asarray(case["image"], float), np.asarray(case["label"]))
        maps = [("reference", label)]
        maps += [(name, seg if index is None else seg[index]) for name, seg in case["predictions"]]
        row[0].imshow(image, cmap="gray")
        row[0].set_title(case["title"] + ("" if index is None else f" (slice {index})"), fontsize=8)
        for ax, (name, seg) in zip(row[1:], maps):
            ax.imshow(image, cmap="gray")
            ax.imshow(np.ma.masked_where(seg == 0, seg - 1), cmap=cmap, vmin=0, vmax=max(num_classes - 2, 1),
                      alpha=0.55, interpolation="nearest")
            ax.set_title(name, fontsize=8)
        for ax in row:
            ax.axis("off")
    return _png(fig)
