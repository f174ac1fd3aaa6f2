"""ACDC 2D inference ablation for one trained model: sliding window vs whole slice, each +- post-processing.

Evaluates a checkpoint (``best.pt`` of a 2D run) on the 40 held-out test volumes four ways:

(a) ``window``:      MONAI sliding window of the training patch size (128 px), Gaussian, overlap 0.5;
(b) ``whole``:       whole slices (zero-padded to a multiple of the network's largest stride);
(c) ``whole+post``:  (b)'s segmentations post-processed as decided on the run's validation cases
                     predicted whole (keep the largest component, nnU-Net's rule;
                     :mod:`medkd.engine.postprocess`);
(d) ``window+post``: (a)'s segmentations post-processed as decided on the validation cases
                     predicted with the sliding window.

No TTA. A decision is the run's ``postprocessing.json`` when it was made for this checkpoint with
the same inference; otherwise it is made here (validation cases of the run's config, preprocessed
into ``OUT/cache``) and written to ``OUT/postprocessing_<window|whole>.json``; the run folder is
never written to.
Pipeline ms/slice is the median over cases of (preprocessing + network + mapping back + argmax
[+ post-processing]) / slices. Prints one table and writes ``summary.csv/json`` into ``OUT``.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/acdc_2d_inference_ablation.py \\
        --checkpoint /work/bench/teacher_full/best.pt --out bench_runs/acdc_2d_inference_ablation

Not a test: two passes of the model over 40 test volumes and over the 20 validation volumes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from medkd.config import load_config
from medkd.data.io import file_ending, write_image
from medkd.engine.inference import Predictor, group_channel_files, read_case, segmentation
from medkd.engine.postprocess import Postprocessing, read_postprocessing
from medkd.engine.validation import decide_run_postprocessing, run_validation_cases
from medkd.evaluation.report import comparison_table, write_csv, write_json

from acdc_2d_supervised import DEFAULT_DATA, folder_scores


def decision(checkpoint: Path, out: Path, whole_slice: bool, console: Console) -> dict:
    """The run's post-processing record for ``checkpoint`` and this inference (existing or decided into ``out``)."""
    stored = checkpoint.parent / "postprocessing.json"
    if stored.is_file():
        record = read_postprocessing(stored)
        state_step = Predictor(checkpoint, postprocess=False).step
        made_for = (record.get("checkpoint"), record.get("step"), record.get("whole_slice"))
        if made_for == (checkpoint.name, state_step, whole_slice):
            console.print(f"post-processing: the run's own decision {stored}")
            return record
    config = load_config(checkpoint.parent / "config.yaml")
    cases = run_validation_cases(config, checkpoint, cache_root=out / "cache")
    name = "whole" if whole_slice else "window"
    console.print(f"post-processing ({name}): deciding on {len(cases)} validation cases of the run")
    return decide_run_postprocessing(checkpoint, cases, output=out / f"postprocessing_{name}.json",
                                     whole_slice=whole_slice)


def applied_steps(record: dict) -> str:
    """The applied steps of a decision record, e.g. ``all-fg, RV, LV`` (``none`` when nothing is applied)."""
    steps = ["all-fg"] if record["foreground_as_one"]["applied"] else []
    steps += [name for name, entry in record["classes"].items() if entry["applied"]]
    return ", ".join(steps) or "none"


def predict_pass(predictor: Predictor, cases: dict[str, list[Path]], folders: dict[str, Path],
                 post: Postprocessing | None) -> dict[str, float]:
    """Write each case's segmentation into ``folders["raw"]`` (and, with ``post``, the post-processed
    one into ``folders["post"]``); median pipeline ms/slice of each."""
    times: dict[str, list[float]] = {name: [] for name in folders}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for case_id, files in cases.items():
        image, geometry = read_case(files)
        name = f"{case_id}{file_ending(files[0])}"
        slices = image.shape[1] if image.ndim == 4 else 1
        start = time.perf_counter()
        seg = segmentation(predictor.predict_arrays(image, geometry))
        raw_ms = (time.perf_counter() - start) * 1000
        write_image(seg, geometry, folders["raw"] / name)
        times["raw"].append(raw_ms / slices)
        if post is not None:
            start = time.perf_counter()
            processed = post.apply(seg)
            times["post"].append((raw_ms + (time.perf_counter() - start) * 1000) / slices)
            write_image(processed, geometry, folders["post"] / name)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of a 2D run (config.yaml beside it)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench_runs/acdc_2d_inference_ablation"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cases", type=int, default=None, help="only the first N test cases (smoke test)")
    args = parser.parse_args()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"ACDC not found at {args.data} (expected nnU-Net raw format with dataset.json)")
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    pred, rows, records = args.out / "predictions", [], {}
    for name, whole_slice in (("window", False), ("whole", True)):
        records[name] = decision(args.checkpoint, args.out, whole_slice, console)
        predictor = Predictor(args.checkpoint, whole_slice=whole_slice, postprocess=False)
        cases = dict(list(group_channel_files(args.data / "imagesTs", predictor.num_channels).items())[: args.cases])
        folders = {"raw": pred / name, "post": pred / f"{name}+post"}
        ms = predict_pass(predictor, cases, folders, Postprocessing.from_record(records[name]))
        for key, folder in folders.items():
            row = folder_scores(folder.name, folder, args.data, num_workers=1, case_ids=list(cases))
            rows.append({**row, "post": applied_steps(records[name]) if key == "post" else "-",
                         "pipeline_ms_slice": ms[key]})
    columns = [("model", "inference", "s"), ("post", "post-processing", "s"),
               ("dice_RV", "Dice RV", ".4f"), ("dice_MYO", "Dice MYO", ".4f"),
               ("dice_LV", "Dice LV", ".4f"), ("mean_dice", "mean Dice", ".4f"), ("hd95", "HD95", ".2f"),
               ("hd95_RV", "HD95 RV", ".2f"), ("hd95_MYO", "HD95 MYO", ".2f"), ("hd95_LV", "HD95 LV", ".2f"),
               ("pipeline_ms_slice", "pipeline ms/slice", ".1f")]
    title = (f"ACDC 2D, {len(cases)} test cases, {args.checkpoint} (patch {predictor.patch_size}, "
             f"{args.threads} thread(s), no TTA); post-processing decided on "
             f"{records['whole']['num_cases']} validation cases")
    console.print(comparison_table(rows, columns, title=title))
    write_csv(rows, args.out / "summary.csv")
    write_json({"rows": rows, "postprocessing": records}, args.out / "summary.json")


if __name__ == "__main__":
    main()
