"""``medkd postprocess``: (re)decide a run's post-processing and say what was decided."""

from __future__ import annotations

from pathlib import Path

from medkd.engine.validation import postprocess_run

__all__ = ["decide_and_report"]


def decide_and_report(run_dir: Path, device: str = "cpu", progress: bool = True) -> list[str]:
    """Decide the post-processing of ``run_dir`` on its validation cases (writes ``postprocessing.json``);
    one line per step (applied or not, validation Dice without and with it) and a closing line."""
    record = postprocess_run(run_dir, device=device, progress=progress)
    lines = []
    for name, step in {"all foreground as one": record["foreground_as_one"], **record["classes"]}.items():
        without, with_ = ("n/a" if d is None else f"{d:.4f}" for d in (step["dice_without"], step["dice_with"]))
        lines.append(f"  {name}: {'applied' if step['applied'] else 'not applied'} "
                     f"(validation Dice {without} without, {with_} with)")
    written = Path(run_dir) / "postprocessing.json"
    lines.append(f"decided on {record['num_cases']} validation case(s); written {written}")
    return lines
