"""Time per distillation step with 1, 3 and 5 teachers, live and from the teacher-output cache.

One optimiser step (student forward + ensemble-kd loss + backward + AdamW) on a batch of 2D patches,
with the teachers run live (``teachers.cache: false``) or with their combined target read from a
cached tensor (what the cache delivers per batch). Teachers and student are registry UNets (teacher
and student presets) with random weights: step time does not depend on what the weights are.
Also prints the one-time cost of filling the cache, per 256 x 224 slice.

    python benchmarks/teacher_step_time.py --members 1 3 5 --steps 20

Not a test: numbers depend on the machine; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console

from medkd.engine.distill import Distiller
from medkd.evaluation.report import comparison_table
from medkd.models import create
from medkd.recipes import load_recipe
from medkd.teachers.cache import TargetSpec, case_target
from medkd.teachers.combine import target_logits


def time_steps(distiller: Distiller, batch: dict, steps: int, warmup: int) -> float:
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    distiller.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = distiller(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = torch.randn(args.batch_size, 1, args.patch, args.patch)
    label = torch.randint(0, args.classes, (args.batch_size, 1, args.patch, args.patch))
    recipe = load_recipe("ensemble-kd")
    live_recipe = recipe.model_copy(update={"teachers": recipe.teachers.model_copy(update={"cache": False})})
    student_state = create("unet", 2, 1, args.classes, preset="student").state_dict()
    rows, base = [], None
    for members in args.members:
        teachers = [create("unet", 2, 1, args.classes, preset="teacher") for _ in range(members)]
        row = {"members": members}
        for mode in ("live", "cached"):
            student = create("unet", 2, 1, args.classes, preset="student")
            student.load_state_dict(student_state)
            distiller = Distiller(student, teachers, live_recipe, spatial_dims=2, in_channels=1, num_classes=args.classes)
            batch = {"image": image, "label": label}
            if mode == "cached":
                distiller.attach_cache([])
                with torch.no_grad():
                    stack = torch.stack([t(image) for t in teachers])
                batch["teacher"] = target_logits("mean_prob", stack, 1.0).half().float()
            row[f"{mode}_s"] = time_steps(distiller, batch, args.steps, args.warmup)
        slice_volume = torch.randn(1, 4, 256, 224).numpy()  # (C=1, z=4, y, x)
        start = time.perf_counter()
        case_target(teachers, slice_volume, TargetSpec("mean_prob"), mode="2d", patch_size=[128, 128],
                    device=torch.device("cpu"))
        row["fill_ms_per_slice"] = (time.perf_counter() - start) * 1000 / 4
        base = base or row["cached_s"]
        row["live_rel"] = row["live_s"] / base
        row["cached_rel"] = row["cached_s"] / base
        rows.append(row)
    columns = [("members", "teachers", "d"), ("live_s", "live s/step", ".3f"), ("cached_s", "cached s/step", ".3f"),
               ("live_rel", "live x (vs 1 cached)", ".2f"), ("cached_rel", "cached x (vs 1 cached)", ".2f"),
               ("fill_ms_per_slice", "cache fill ms/slice", ".0f")]
    title = (f"distillation step time, ensemble-kd, batch {args.batch_size} x {args.patch}^2, "
             f"{args.threads} thread(s), median of {args.steps}")
    Console(width=160).print(comparison_table(rows, columns, title=title))


if __name__ == "__main__":
    main()
