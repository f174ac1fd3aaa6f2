"""The model card of a bundle (its ``README.md``): what the network is, how it was made, how it does.

Built from the bundle plan (:mod:`medkd.deploy.bundle`) and the run's record (:func:`card_facts`
of the checkpoint's resolved config, ``result.json`` and an evaluation summary when the run folder
holds one). Plain Python: no PyTorch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["card_facts", "model_card"]


def _evaluation(run_dir: Path) -> tuple[Path, dict[str, float]] | None:
    """Per-class test Dice of the first ``evaluation/summary.json`` in the run folder or one level below."""
    for path in [run_dir / "evaluation" / "summary.json", *sorted(run_dir.glob("*/evaluation/summary.json"))]:
        try:
            summary = json.loads(path.read_text())
            dice = {name: float(row["dice_mean"]) for name, row in summary.items()
                    if isinstance(row, dict) and "dice_mean" in row}
        except (OSError, ValueError, TypeError):
            continue
        if dice:
            return path, dice
    return None


def card_facts(checkpoint: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Data, recipe, teacher and results of the run that wrote ``checkpoint`` (``None`` where unknown)."""
    config = state.get("config") or {}
    data, distill = config.get("data") or {}, config.get("distill") or {}
    recipe = distill.get("recipe") or {}
    result_path = checkpoint.parent / "result.json"
    try:
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    except (OSError, ValueError):
        result = {}
    evaluation = _evaluation(checkpoint.parent)
    return {
        "dataset": data.get("dataset"), "fold": data.get("fold"),
        "loss": (config.get("train") or {}).get("loss"),
        "recipe": recipe.get("name"), "recipe_description": recipe.get("description"),
        "teacher": distill.get("teacher"),
        "best_val_dice": state.get("best_metric", result.get("best_metric")),
        "test_dice": None if evaluation is None else evaluation[1],
        "test_dice_source": None if evaluation is None else str(evaluation[0]),
    }


def _number(value: float | int | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _dice_lines(facts: dict[str, Any]) -> list[str]:
    dice = facts.get("test_dice")
    if not dice:
        return ["- Test Dice: not evaluated (no `evaluation/summary.json` in the run folder)"]
    finite = [d for d in dice.values() if not math.isnan(d)]
    mean = sum(finite) / len(finite) if finite else math.nan
    per_class = ", ".join(f"{name} {_number(d, 3)}" for name, d in dice.items())
    return [f"- Test Dice: {_number(mean, 3)} mean ({per_class}); from `{facts['test_dice_source']}`"]


def _post_text(steps: dict[str, list[int]] | None) -> str:
    if not steps or not (steps["foreground"] or steps["classes"]):
        return "argmax only"
    parts = (["all foreground labels as one"] if steps["foreground"] else []) + [f"label {c}" for c in steps["classes"]]
    return "keep the largest connected component of " + ", then ".join(parts)


def _precision_lines(model: dict[str, Any]) -> list[str]:
    """What the weights and activations of ``model.onnx`` are, and how far that moved it from fp32."""
    record = model.get("quantization")
    if not record:
        return ["- Precision: fp32"]
    versus, cases = record["vs_fp32"], record["calibration_cases"]
    how = (f"static int8 quantization (QDQ; weights {record['weights']}, activations {record['activations']}, "
           f"{record['calibration']} calibration on {record['calibration_samples']} network inputs)"
           if model["precision"] == "int8" else "float16 weights and activations (float32 input and output)")
    return [f"- Precision: {model['precision']}: {how}",
            f"- Against the fp32 export on {versus['inputs']}"
            + (f" ({', '.join(cases['cases'])} of `{cases['source']}`)" if cases["cases"] else "") + ": "
            f"{100 * versus['label_agreement']:.2f}% equal labels, max |logit diff| {versus['max_abs_logit_diff']:.3g}"]


def model_card(plan: dict[str, Any], facts: dict[str, Any]) -> str:
    """Markdown model card of the bundle described by ``plan``, with the run's ``facts`` (:func:`card_facts`)."""
    model, pre, inference, latency = plan["model"], plan["preprocessing"], plan["inference"], plan["latency"]
    spec = model["spec"]
    post = _post_text(plan.get("postprocessing"))
    labels = ", ".join(f"{value}: {name}" for name, value in sorted(plan["labels"].items(), key=lambda kv: kv[1]))
    lines = [
        f"# {spec['name']} {spec['preset']} ({pre['mode']}) - medkd bundle", "",
        "## Model",
        f"- Architecture: `{spec['name']}`, preset {spec['preset']} (shrink {spec['shrink']}), "
        f"{spec['spatial_dims']}D, {spec['in_channels']} channel(s) in, {spec['out_channels']} classes out",
        f"- Parameters: {_number(model['parameters'])}; MACs per {'x'.join(map(str, inference['patch_size']))} "
        f"window: {_number(model['macs_per_window'])}",
        f"- `model.onnx`: ONNX opset {model['opset']}, input `{model['input']}` (B, C, *spatial) "
        f"float32, output `{model['output']}` (B, K, *spatial); ONNX vs PyTorch max |logit diff| "
        f"{model['onnx_max_abs_diff']:.2e}" + (" (fp32, before conversion)" if model.get("quantization") else ""),
        *_precision_lines(model),
        f"- Source: `{plan['source']['checkpoint']}` (step {plan['source']['step']})", "",
        "## Data and training",
        f"- Dataset: `{facts.get('dataset')}` (fold {facts.get('fold')}); labels {labels}",
        f"- Recipe: {facts.get('recipe') or 'supervised (no distillation)'}"
        + (f" - {facts['recipe_description']}" if facts.get("recipe_description") else "")
        + (f"; loss {facts['loss']}" if facts.get("loss") else ""),
        f"- Teacher: {('`' + str(facts['teacher']) + '`') if facts.get('teacher') else 'none'}", "",
        "## Results",
        f"- Best validation Dice: {_number(facts.get('best_val_dice'))}",
        *_dice_lines(facts),
        f"- Latency at export: {latency['median_ms']:.1f} ms median ({latency['best_ms']:.1f} best) per "
        f"{'x'.join(map(str, latency['input_shape']))} window, {latency['engine']}, {latency['threads']} thread(s), "
        f"{latency.get('machine', 'this machine')}", "",
        "## Preprocessing (`plan.json`)",
        f"- Mode {pre['mode']}; normalisation {', '.join(pre['normalization'])}; target spacing "
        f"{pre['target_spacing'] or 'none (native grid)'}; crop to non-zero: {pre['crop_nonzero']}",
        f"- Inference: {'whole slices' if inference['whole_slice'] else 'Gaussian sliding window'} of "
        f"{inference['patch_size']}, overlap {inference['overlap']}; post-processing: {post}", "",
        "## Run it (no PyTorch needed)",
        "```", "medkd predict --bundle THIS_FOLDER -i IMAGES -o OUT", "```",
        "Every file is checked against the SHA-256 in `plan.json` before the model runs.", "",
    ]
    return "\n".join(lines)
