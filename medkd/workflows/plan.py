"""``medkd plan``: a dataset's fingerprint and plans, as a file, a table, and as run-config defaults.

:func:`make_plans` fingerprints a dataset (cached in its medkd cache) and plans every configuration
(:mod:`medkd.plans.planner`); :func:`write_plans` stores them (atomically, never over an existing file
unless asked); :func:`plans_table` shows them. :func:`plan_defaults` turns one configuration into
dotted-key run-config defaults, applied *under* a config file, flags and ``--set`` (see
:func:`medkd.workflows.train.run_from_options`), and :data:`PLAN_KEY` stores the plan with the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from medkd.config import ConfigError
from medkd.data.dataset import load_dataset
from medkd.data.fingerprint import load_or_compute_fingerprint
from medkd.data.store import default_cache_root
from medkd.plans import Budget, plan_dataset
from medkd.storage import atomic_write_text

PLAN_KEY = "plan"  # the run config's section holding the plan a run was configured from


def make_plans(dataset: str | Path, *, cache_dir: str | Path | None = None, budget: Budget | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """Fingerprint ``dataset`` (cached under ``cache_dir``, default ``$MEDKD_CACHE`` or ``.cache/medkd``) and plan
    it for ``budget``. Raises DatasetError naming the case on bad input (empty, bad spacing, tiny, constant)."""
    info = load_dataset(dataset)
    fingerprint = load_or_compute_fingerprint(info, Path(cache_dir or default_cache_root()), progress)
    plans = plan_dataset(fingerprint, info.num_classes, budget)
    plans["dataset_root"] = str(Path(dataset).resolve())
    return plans


def fingerprint_bar(cases: Iterable[Any]) -> Iterable[Any]:
    """The training cases behind a progress bar naming the work (fingerprinting reads every one, once)."""
    from tqdm.auto import tqdm

    return tqdm(cases, desc="fingerprint (reading every training case once)", unit="case", mininterval=1.0)


def write_plans(plans: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Write ``plans`` as JSON to ``path`` (atomic); an existing file is refused unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; choose another -o or pass --force to replace it")
    atomic_write_text(path, json.dumps(plans, indent=1))
    return path


def load_plans(path: str | Path) -> dict[str, Any]:
    """Read a plans file written by ``medkd plan``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plans file not found: {path}")
    try:
        plans = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"plans file {path} is not valid JSON: {err}") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise ConfigError(f"plans file {path} has no 'configurations' (write it with `medkd plan`)")
    return plans


def choose_configuration(plans: Mapping[str, Any], configuration: str | None, mode: str | None,
                         source: str = "the plan") -> str:
    """The configuration to run: the one named, else ``3d_fullres`` for mode 3d, else ``2d``."""
    available = plans["configurations"]
    name = configuration or ("3d_fullres" if mode == "3d" else "2d")
    if name not in available:
        raise ConfigError(f"{source} has no configuration {name!r}; it has {', '.join(available)}")
    planned_mode = available[name]["mode"]
    if mode is not None and mode != planned_mode:
        raise ConfigError(f"data.mode={mode} contradicts configuration {name!r} of {source} (mode {planned_mode})")
    return name


def plan_defaults(plans: Mapping[str, Any], name: str, *, model: str | None, preset: str | None,
                  shrink_given: bool) -> dict[str, Any]:
    """Dotted-key run-config defaults of configuration ``name``: mode, patch, batch, spacing, normalisation and,
    for the planned model (``unet``), its widths and per-axis strides, and the preset's planned width."""
    plan = plans["configurations"][name]
    schemes = set(plan["normalization"])
    defaults: dict[str, Any] = {
        "data.mode": plan["mode"], "data.patch_size": list(plan["patch_size"]), "data.batch_size": plan["batch_size"],
        "data.target_spacing": plan["target_spacing"], "data.normalization": schemes.pop() if len(schemes) == 1 else "auto",
    }
    network = plan["student" if preset == "student" else "teacher"]
    if (model or network["model"]) == network["model"]:
        defaults["model.kwargs"] = {"channels": network["channels"], "strides": network["strides"]}
        if not shrink_given:
            defaults["model.shrink"] = network["shrink"]
    defaults[PLAN_KEY] = {"configuration": name, "plans": dict(plans)}
    return {k: v for k, v in defaults.items() if v is not None}


def _row(label: str, plans: Mapping[str, Any], value: Callable[[dict[str, Any]], Any]) -> list[str]:
    return [label, *(str(value(c)) for c in plans["configurations"].values())]


def _size(values: Iterable[Any]) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _network_text(net: Mapping[str, Any]) -> str:
    return (f"{net['model']} shrink {net['shrink']}, {net['parameters']:,} params, {net['gmacs_per_step']:.2f} GMAC/step"
            f", ~{net['est_step_s']:.2f} s/step, ~{net['est_steps_in_budget']:,} steps")


def plans_table(plans: Mapping[str, Any]) -> Table:
    """One column per configuration: spacing, shapes, patch, batch, normalisation, stages, networks, trades."""
    fp, budget = plans["fingerprint"], plans["budget"]
    unit = "mm" if fp["physical_spacing"] else "px"
    title = (f"medkd plan: {plans['dataset']} ({fp['num_cases']} cases, {fp['num_channels']} channel(s), "
             f"{fp['spatial_dims']}D, median spacing {_size(round(s, 3) for s in fp['median_spacing'])} {unit}, "
             f"anisotropy {fp['anisotropy']:.2f}); budget: {budget['min_steps']} teacher steps in "
             f"{budget['minutes']:g} min on {budget['threads']} thread(s) at {budget['gmacs_per_thread']:g} GMAC/s, "
             f"{budget['memory_gb']:g} GB")
    table = Table(title=title, show_lines=True)
    table.add_column("")
    for name in plans["configurations"]:
        table.add_column(name)
    rows = [
        ("target spacing (z, y, x)", lambda c: f"{_size(round(s, 3) for s in c['target_spacing'])} {unit}"
         if c["target_spacing"] else "as is (no physical spacing)"),
        ("median shape (z, y, x)", lambda c: _size(c["median_shape"])),
        ("patch", lambda c: _size(c["patch_size"])), ("batch", lambda c: c["batch_size"]),
        ("normalisation", lambda c: ", ".join(c["normalization"])),
        ("stages / pools per axis", lambda c: f"{c['num_stages']} / {_size(c['pools_per_axis'])}"),
        ("teacher", lambda c: _network_text(c["teacher"])), ("student", lambda c: _network_text(c["student"])),
        ("traded", lambda c: "; ".join(c["trades"]) or "nothing"),
    ]
    for label, value in rows:
        table.add_row(*_row(label, plans, value))
    return table


def fingerprint_lines(plans: Mapping[str, Any]) -> list[str]:
    """Foreground intensities per channel and class voxel frequencies, one line each."""
    fp = plans["fingerprint"]
    lines = [f"channel {c} ({name}): foreground mean {s['mean']:.4g}, std {s['std']:.4g}, 0.5-99.5% "
             f"[{s['percentile_00_5']:.4g}, {s['percentile_99_5']:.4g}]"
             for c, (name, s) in enumerate(zip(fp["channel_names"], fp["foreground_intensities"]))]
    lines.append("class voxel frequencies: " + ", ".join(f"{k} {v:.4%}" for k, v in fp["class_frequencies"].items()))
    return lines


def _explicit_keys(tree: Mapping[str, Any]) -> set[str]:
    """``section.key`` of every entry a config file sets (plan defaults live at that depth)."""
    return {f"{section}.{key}" for section, body in tree.items() if isinstance(body, dict) for key in body} | set(tree)


def _divides(patch: list[int], strides: list[list[int]]) -> bool:
    return all(p % math.prod(s[axis] for s in strides) == 0 for axis, p in enumerate(patch))


def planned_overrides(overrides: Mapping[str, Any], file_tree: Mapping[str, Any], *, plan: str | Path | None,
                      configuration: str | None, note: Callable[[str], Any] = print) -> dict[str, Any]:
    """``overrides`` (flags, ``--set``, a command's defaults) over the defaults of a plan, for keys that neither
    they nor the config file (``file_tree``) set. The plan is the file ``plan`` or, without one, made now from the
    dataset (cached fingerprint), or the plan stored in ``overrides`` (a distillation run's teacher's); without a
    dataset, or when no configuration fits an explicit ``data.mode`` (a 2D dataset asked for 3D) and none was
    named, ``overrides`` are returned unchanged."""
    explicit = set(overrides) | _explicit_keys(file_tree)

    def given(key: str, default: Any = None) -> Any:
        section, name = key.split(".")
        return overrides.get(key, (file_tree.get(section) or {}).get(name, default))

    mode, dataset = given("data.mode"), given("data.dataset")
    stored = overrides.get(PLAN_KEY)  # a distillation run's default: the plan its teacher was configured from
    if plan is not None:
        plans, source = load_plans(plan), str(plan)
    elif isinstance(stored, dict) and isinstance(stored.get("plans"), dict):
        plans, source = stored["plans"], "the teacher's plan"
        configuration = configuration or stored.get("configuration")
    elif dataset is None:
        return dict(overrides)
    else:
        plans = make_plans(dataset, cache_dir=given("data.cache_dir"), progress=fingerprint_bar)
        source = f"the plan of {dataset}"
        if configuration is None and choose_default(plans, mode) is None:
            return dict(overrides)
    name = choose_configuration(plans, configuration, mode, source)
    defaults = plan_defaults(plans, name, model=given("model.name"), preset=given("model.preset"),
                             shrink_given="model.shrink" in explicit)
    merged = {**{k: v for k, v in defaults.items() if k not in explicit}, **overrides}
    kwargs = merged.get("model.kwargs")
    if "model.kwargs" not in explicit and kwargs and not _divides(given("data.patch_size") or merged["data.patch_size"],
                                                                  kwargs["strides"]):
        merged.pop("model.kwargs")  # the planned strides do not divide the given patch: registry defaults
        if "model.shrink" not in explicit:
            merged.pop("model.shrink", None)
    note(f"plan: configuration {name} of {source} (patch {merged.get('data.patch_size', given('data.patch_size'))}, "
         f"batch {merged.get('data.batch_size', given('data.batch_size'))}); flags, --set and --config override it")
    return merged


def choose_default(plans: Mapping[str, Any], mode: str | None) -> str | None:
    """The configuration a run gets without ``--configuration``: 3d_fullres for mode 3d, else 2d (None if absent)."""
    name = "3d_fullres" if mode == "3d" else "2d"
    return name if name in plans["configurations"] else None
