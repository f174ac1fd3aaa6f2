"""timm-like registry of segmentation networks built on ``monai.networks.nets``.

Every entry is available as a *teacher* (full width) and a *student* (ReCo-KD style
channel shrinking: same depth, strides and skip connections, only the widths change).

Example::

    from medkd.models import create, create_from_spec

    teacher = create("unet", spatial_dims=2, in_channels=1, out_channels=4)
    student = create("unet", 2, 1, 4, preset="student")        # 8x narrower
    clone = create_from_spec(student.medkd_spec.to_dict())     # rebuild from a checkpoint

All models take inputs ``(B, in_channels, *spatial)`` whose spatial sizes are divisible
by 16 and return logits ``(B, out_channels, *spatial)`` in eval mode.  ``dynunet`` with
``deep_supervision=True`` returns, in train mode only, the stacked heads
``(B, K, out_channels, *spatial)`` with ``K = deep_supr_num + 1`` (head 0 is the full
resolution output, the others are upsampled to full resolution by MONAI).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.nn as nn
from monai.networks import nets

__all__ = [
    "PRESETS",
    "PRESET_KWARGS",
    "ModelSpec",
    "create",
    "create_from_spec",
    "list_models",
    "register_model",
    "scale_channels",
]

#: preset name -> channel shrink exponent ``t`` (widths divided by ``2**t``).
PRESETS: dict[str, int] = {"teacher": 0, "student": 3}

#: preset name -> (model name, spatial dims) -> constructor overrides the preset adds unless ``kwargs`` set them.
#: 2D students of ``unet`` use ReLU instead of MONAI's PReLU: on the full-resolution maps of a narrow student
#: onnxruntime's PRelu kernel (a per-channel broadcast) costs far more than Relu, and the ReLU student runs
#: 1.7-1.9x faster deployed with the same Dice once distilled (README, "Ship the student"). 3D students keep
#: PReLU: trained on labels alone, the 3D ReLU student scored 9 points lower (README, "Student activation").
#: The overrides are written into the model's spec, so a checkpoint rebuilds the network it was trained with
#: whatever the preset's defaults become.
PRESET_KWARGS: dict[str, dict[tuple[str, int], dict[str, Any]]] = {
    "teacher": {},
    "student": {("unet", 2): {"act": "relu"}},
}

#: keys of :class:`ModelSpec` that are set from positional arguments, not ``kwargs``.
_RESERVED_KWARGS = frozenset({"spatial_dims", "in_channels", "out_channels", "deep_supervision"})


@dataclass
class ModelSpec:
    """Everything needed to rebuild a registry model (stored in checkpoints as a plain dict).

    Args:
        name: registry name, see :func:`list_models`.
        spatial_dims: 2 or 3.
        in_channels: number of input image channels.
        out_channels: number of output classes (logit channels).
        preset: ``"teacher"`` or ``"student"``; kept for bookkeeping, ``shrink`` and ``kwargs`` (which
            hold what the preset resolved to when the model was created) are authoritative.
        shrink: channel shrink exponent ``t``: every width ``C`` becomes ``max(4, C // 2**t)``.
        deep_supervision: extra low-resolution heads (``dynunet`` only).
        kwargs: extra constructor overrides passed to the builder (e.g. ``depth`` for
            ``dynunet``, ``channels`` for ``unet``). Width overrides are teacher widths and
            are still scaled by ``shrink``.
    """

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    preset: str = "teacher"
    shrink: int = 0
    deep_supervision: bool = False
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain ``dict`` deep copy with tuples turned into lists (checkpoint / YAML / JSON safe)."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise TypeError(f"ModelSpec.from_dict expects a dict, got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelSpec keys {unknown}; valid keys are {sorted(known)}.")
        data = dict(d)
        data["kwargs"] = dict(data.get("kwargs") or {})
        return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


Builder = Callable[[ModelSpec], nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(spec: ModelSpec) -> nn.Module`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Model name must be a non-empty string, got {name!r}.")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"Model {name!r} is already registered.")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def scale_channels(channels: Sequence[int], shrink: int, min_channels: int = 4) -> tuple[int, ...]:
    """ReCo-KD width scaling ``C' = max(C_min, C // 2**t)`` applied to every entry.

    ``shrink == 0`` returns the widths unchanged (a teacher is never altered).

    Example: ``scale_channels((32, 64, 128, 256, 512), 3) == (4, 8, 16, 32, 64)``.
    """
    if isinstance(shrink, bool) or not isinstance(shrink, int) or shrink < 0:
        raise ValueError(f"shrink must be a non-negative int, got {shrink!r}.")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}.")
    widths = tuple(int(c) for c in channels)
    if any(c < 1 for c in widths):
        raise ValueError(f"channel widths must be positive, got {widths}.")
    if shrink == 0:
        return widths
    return tuple(max(min_channels, c // 2**shrink) for c in widths)


def _resolve_shrink(preset: str, shrink: int | None) -> int:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; available presets: {sorted(PRESETS)}.")
    return PRESETS[preset] if shrink is None else shrink


def _check_spec(spec: ModelSpec) -> None:
    if spec.name not in _REGISTRY:
        raise ValueError(f"Unknown model {spec.name!r}; available models: {list_models()}.")
    if spec.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spec.spatial_dims!r}.")
    for key in ("in_channels", "out_channels"):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}.")
    if spec.preset not in PRESETS:
        raise ValueError(f"Unknown preset {spec.preset!r}; available presets: {sorted(PRESETS)}.")
    if isinstance(spec.shrink, bool) or not isinstance(spec.shrink, int) or spec.shrink < 0:
        raise ValueError(f"shrink must be a non-negative int, got {spec.shrink!r}.")
    clash = sorted(_RESERVED_KWARGS & set(spec.kwargs))
    if clash:
        raise ValueError(f"{clash} must be given as arguments of create(), not as extra kwargs.")


def create_from_spec(spec: ModelSpec | dict) -> nn.Module:
    """Build the model described by ``spec`` and attach it as ``model.medkd_spec``."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec or dict, got {type(spec).__name__}.")
    _check_spec(spec)
    model = _REGISTRY[spec.name](spec)
    model.medkd_spec = ModelSpec.from_dict(spec.to_dict())  # private copy
    return model


def create(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    preset: str = "teacher",
    shrink: int | None = None,
    deep_supervision: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a registered segmentation network.

    Args:
        name: one of :func:`list_models`.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output classes; the model returns logits ``(B, out_channels, *spatial)``.
        preset: ``"teacher"`` (shrink 0) or ``"student"`` (shrink 3, 8x narrower, floor 4; a 2D ``unet``
            student uses ReLU, see :data:`PRESET_KWARGS`).
        shrink: explicit shrink exponent, overrides the preset's.
        deep_supervision: only for ``dynunet``; train-mode output becomes ``(B, K, C, *spatial)``.
        kwargs: extra constructor overrides (see :class:`ModelSpec`); they win over the preset's.

    Raises:
        ValueError: unknown name/preset, bad dims/channels, unsupported deep supervision.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; available models: {list_models()}.")
    spec = ModelSpec(
        name=name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        preset=preset,
        shrink=_resolve_shrink(preset, shrink),
        deep_supervision=bool(deep_supervision),
        kwargs={**PRESET_KWARGS.get(preset, {}).get((name, spatial_dims), {}), **kwargs},
    )
    return create_from_spec(spec)


# ----------------------------------------------------------------------------- builders


def _no_deep_supervision(spec: ModelSpec) -> None:
    if spec.deep_supervision:
        raise ValueError(f"Model {spec.name!r} does not support deep_supervision; use 'dynunet'.")


def _options(spec: ModelSpec, defaults: dict, width_key: str) -> dict:
    """Merge defaults with ``spec.kwargs`` and scale the width entry ``width_key``."""
    opts = {**defaults, **spec.kwargs}
    opts[width_key] = scale_channels(opts[width_key], spec.shrink)
    return opts


@register_model("unet")
def _build_unet(spec: ModelSpec) -> nn.Module:
    """MONAI residual UNet, teacher channels (32, 64, 128, 256, 512), strides (2, 2, 2, 2)."""
    _no_deep_supervision(spec)
    defaults = {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2), "num_res_units": 2}
    opts = _options(spec, defaults, "channels")
    return nets.UNet(spec.spatial_dims, spec.in_channels, spec.out_channels, **opts)


@register_model("basicunet")
def _build_basicunet(spec: ModelSpec) -> nn.Module:
    """MONAI BasicUNet, teacher features (32, 32, 64, 128, 256, 32) (six entries, all scaled)."""
    _no_deep_supervision(spec)
    opts = _options(spec, {"features": (32, 32, 64, 128, 256, 32)}, "features")
    if len(opts["features"]) != 6:
        raise ValueError(f"basicunet needs 6 feature widths, got {opts['features']}.")
    return nets.BasicUNet(
        spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=spec.out_channels, **opts
    )


@register_model("attentionunet")
def _build_attentionunet(spec: ModelSpec) -> nn.Module:
    """MONAI AttentionUnet, teacher channels (32, 64, 128, 256, 512), strides (2, 2, 2, 2)."""
    _no_deep_supervision(spec)
    defaults = {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2)}
    opts = _options(spec, defaults, "channels")
    return nets.AttentionUnet(spec.spatial_dims, spec.in_channels, spec.out_channels, **opts)


@register_model("segresnet")
def _build_segresnet(spec: ModelSpec) -> nn.Module:
    """MONAI SegResNet, teacher init_filters 32, blocks_down (1, 2, 2, 4).

    GroupNorm uses ``gcd(8, init_filters)`` groups so that narrow students stay valid.
    """
    _no_deep_supervision(spec)
    opts = {"init_filters": 32, "blocks_down": (1, 2, 2, 4), **spec.kwargs}
    init = scale_channels((opts["init_filters"],), spec.shrink)[0]
    opts["init_filters"] = init
    opts.setdefault("norm", ("GROUP", {"num_groups": math.gcd(8, init)}))
    return nets.SegResNet(
        spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=spec.out_channels, **opts
    )


_DYNUNET_FILTERS = (32, 64, 128, 256, 320, 320)


@register_model("dynunet")
def _build_dynunet(spec: ModelSpec) -> nn.Module:
    """nnU-Net-like MONAI DynUNet.

    ``depth`` stages (kwarg, default 5): kernel 3, strides ``[1, 2, 2, ...]``, filters
    ``(32, 64, 128, 256, 320, 320, 320, ...)[:depth]``, instance norm, leaky ReLU.
    With ``deep_supervision`` the train-mode output is ``(B, deep_supr_num + 1, C, *spatial)``;
    ``deep_supr_num`` defaults to ``depth - 2`` (every decoder level above the bottleneck's).
    """
    opts = dict(spec.kwargs)
    depth = int(opts.pop("depth", 5))
    if depth < 2:
        raise ValueError(f"dynunet depth must be >= 2, got {depth}.")
    filters = opts.pop("filters", None)
    if filters is None:
        filters = tuple(_DYNUNET_FILTERS[min(i, len(_DYNUNET_FILTERS) - 1)] for i in range(depth))
    if len(filters) != depth:
        raise ValueError(f"dynunet filters {tuple(filters)} must have depth={depth} entries.")
    strides = opts.pop("strides", [1] + [2] * (depth - 1))
    kernel_size = opts.pop("kernel_size", [3] * depth)
    upsample = opts.pop("upsample_kernel_size", list(strides[1:]))
    if spec.deep_supervision:
        opts.setdefault("deep_supr_num", max(1, depth - 2))
    return nets.DynUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=upsample,
        filters=list(scale_channels(filters, spec.shrink)),
        deep_supervision=spec.deep_supervision,
        **opts,
    )
