"""Reading an nnU-Net v2 results folder's ``plans.json`` and ``dataset.json`` (no nnunetv2 needed).

A trained nnU-Net v2 model lives in ``nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/``::

    plans.json  dataset.json  fold_0/checkpoint_final.pth  fold_1/...

:func:`read_nnunet_configuration` resolves one configuration of the plans (following
``inherits_from``, as nnU-Net's ``PlansManager`` does) into an :class:`NnunetConfiguration`: the
network's architecture entry, the patch size, the labels and input channels of ``dataset.json`` and
the preprocessing plan (:func:`preprocessing_entry`) that :mod:`medkd.data.nnunet_preprocess` applies.
Every missing or unsupported key raises :class:`NnunetPlansError` naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NNUNET_NORMALIZATIONS", "NnunetConfiguration", "NnunetPlansError", "preprocessing_entry",
           "read_json", "read_nnunet_configuration", "resolve_configuration"]

#: nnU-Net normalisation class names medkd re-implements (:mod:`medkd.data.nnunet_preprocess`)
NNUNET_NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                         "RGBTo01Normalization")
_RESAMPLING = "resample_data_or_seg_to_shape"
_DEFAULT_RESAMPLING = {"data": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                       "seg": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                       "probabilities": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}


class NnunetPlansError(ValueError):
    """A results folder's plans.json / dataset.json is missing, malformed or unsupported; names file and key."""


@dataclass
class NnunetConfiguration:
    """One configuration of an nnU-Net v2 plan, as medkd needs it."""

    name: str  # "2d", "3d_fullres", "3d_lowres"...
    architecture: dict[str, Any]  # network_class_name, arch_kwargs, kw_requires_import
    patch_size: list[int]
    labels: dict[str, int]  # class name -> value, background included
    num_channels: int
    preprocessing: dict[str, Any]  # see preprocessing_entry

    @property
    def mode(self) -> str:
        return "2d" if len(self.patch_size) == 2 else "3d"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`NnunetPlansError` naming the file otherwise."""
    if not path.is_file():
        raise NnunetPlansError(f"{path}: file not found (is {path.parent} an nnU-Net v2 results folder? it holds "
                               "plans.json, dataset.json and fold_X/checkpoint_final.pth)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NnunetPlansError(f"{path}: cannot read JSON: {err}") from None
    if not isinstance(data, dict):
        raise NnunetPlansError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _need(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in mapping:
        raise NnunetPlansError(f"{where}: key {key!r} is missing")
    value = mapping[key]
    if not isinstance(value, kind):
        raise NnunetPlansError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def resolve_configuration(plans: dict[str, Any], name: str, source: Path | str = "plans.json",
                          seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Configuration ``name`` of ``plans`` with its ``inherits_from`` parents' keys filled in."""
    configurations = _need(plans, "configurations", dict, str(source))
    if name not in configurations:
        raise NnunetPlansError(f"{source}: configurations.{name}: configuration {name!r} is not in the plans; "
                               f"available: {', '.join(configurations)}")
    config = dict(_need(configurations, name, dict, f"{source}: configurations"))
    parent = config.get("inherits_from")
    if parent is None:
        return config
    if parent in (*seen, name):
        raise NnunetPlansError(f"{source}: configurations.{name}.inherits_from: circular inheritance via {parent!r}")
    return {**resolve_configuration(plans, parent, source, (*seen, name)), **config}


def _labels(dataset: dict[str, Any], source: Path) -> dict[str, int]:
    labels = _need(dataset, "labels", dict, str(source))
    if "regions_class_order" in dataset or any(not isinstance(v, int) for v in labels.values()):
        raise NnunetPlansError(f"{source}: labels: region-based nnU-Net models (label values that are lists) are "
                               "not supported")
    return {k: int(v) for k, v in labels.items() if k != "ignore"}


def _resampling(config: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    name = config.get(f"resampling_fn_{kind}", _RESAMPLING)
    if name != _RESAMPLING:
        raise NnunetPlansError(f"{where}.resampling_fn_{kind}: {name!r} is not supported (only {_RESAMPLING})")
    return {**_DEFAULT_RESAMPLING[kind], **(config.get(f"resampling_fn_{kind}_kwargs") or {})}


def preprocessing_entry(plans: dict[str, Any], config: dict[str, Any], num_channels: int,
                        source: str = "plans.json", configuration: str = "") -> dict[str, Any]:
    """What nnU-Net's ``DefaultPreprocessor`` needs for one configuration, as plain JSON.

    Keys: ``transpose_forward``, ``transpose_backward`` (axis orders), ``spacing`` (target spacing
    after the transpose; 2 entries in 2D), ``normalization`` and ``use_mask_for_norm`` per channel,
    ``intensity`` per channel (``mean``, ``std``, ``percentile_00_5``, ``percentile_99_5`` of the
    dataset fingerprint's foreground voxels, used by ``CTNormalization``), ``resampling`` kwargs of
    ``resample_data_or_seg_to_shape`` for ``data``, ``seg`` and ``probabilities``.
    """
    where = f"{source}: configurations.{configuration}"
    preprocessor = config.get("preprocessor_name", "DefaultPreprocessor")
    if preprocessor != "DefaultPreprocessor":
        raise NnunetPlansError(f"{where}.preprocessor_name: {preprocessor!r} is not supported (only DefaultPreprocessor)")
    schemes = _need(config, "normalization_schemes", list, where)
    masks = _need(config, "use_mask_for_norm", list, where)
    if len(schemes) != num_channels or len(masks) != num_channels:
        raise NnunetPlansError(f"{where}.normalization_schemes: {len(schemes)} scheme(s) / {len(masks)} mask flag(s) "
                               f"for {num_channels} input channel(s)")
    for c, scheme in enumerate(schemes):
        if scheme not in NNUNET_NORMALIZATIONS:
            raise NnunetPlansError(f"{where}.normalization_schemes[{c}]: unknown scheme {scheme!r}; supported: "
                                   f"{', '.join(NNUNET_NORMALIZATIONS)}")
    intensity = plans.get("foreground_intensity_properties_per_channel") or {}
    stats = []
    for c, scheme in enumerate(schemes):
        row = intensity.get(str(c))
        if scheme == "CTNormalization":
            row = _need(intensity, str(c), dict, f"{source}: foreground_intensity_properties_per_channel")
            for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
                _need(row, key, (int, float), f"{source}: foreground_intensity_properties_per_channel.{c}")
        stats.append({k: float(row[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k in row}
                     if isinstance(row, dict) else None)
    forward = [int(a) for a in _need(plans, "transpose_forward", list, source)]
    backward = [int(a) for a in _need(plans, "transpose_backward", list, source)]
    if sorted(forward) != [0, 1, 2] or [forward[b] for b in backward] != [0, 1, 2]:
        raise NnunetPlansError(f"{source}: transpose_forward {forward} / transpose_backward {backward} are not "
                               "inverse permutations of (0, 1, 2)")
    return {"transpose_forward": forward, "transpose_backward": backward,
            "spacing": [float(s) for s in _need(config, "spacing", list, where)],
            "normalization": list(schemes), "use_mask_for_norm": [bool(m) for m in masks], "intensity": stats,
            "resampling": {kind: _resampling(config, kind, where) for kind in ("data", "seg", "probabilities")}}


def read_nnunet_configuration(results_dir: str | Path, configuration: str) -> NnunetConfiguration:
    """Configuration ``configuration`` of the results folder ``results_dir`` (plans.json + dataset.json)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise NnunetPlansError(f"{root}: not a folder (expected an nnU-Net v2 results folder)")
    plans_path, dataset_path = root / "plans.json", root / "dataset.json"
    plans, dataset = read_json(plans_path), read_json(dataset_path)
    config = resolve_configuration(plans, configuration, plans_path)
    where = f"{plans_path}: configurations.{configuration}"
    arch = _need(config, "architecture", dict, where)
    entry = {"network_class_name": _need(arch, "network_class_name", str, f"{where}.architecture"),
             "arch_kwargs": _need(arch, "arch_kwargs", dict, f"{where}.architecture"),
             "kw_requires_import": list(_need(arch, "_kw_requires_import", (list, tuple), f"{where}.architecture"))}
    patch = [int(p) for p in _need(config, "patch_size", list, where)]
    if len(patch) not in (2, 3):
        raise NnunetPlansError(f"{where}.patch_size: expected 2 or 3 entries, got {patch}")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise NnunetPlansError(f"{dataset_path}: key 'channel_names' is missing or empty")
    pre = preprocessing_entry(plans, config, len(channels), str(plans_path), configuration)
    return NnunetConfiguration(name=configuration, architecture=entry, patch_size=patch,
                               labels=_labels(dataset, dataset_path), num_channels=len(channels), preprocessing=pre)
