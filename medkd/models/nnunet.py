"""nnU-Net v2 networks (``dynamic-network-architectures``) as registry model ``nnunet``.

An nnU-Net v2 plans file describes each configuration's network by an ``architecture`` entry::

    {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
     "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, ...], "conv_op": "torch.nn.modules.conv.Conv2d",
                     "kernel_sizes": [[3, 3], ...], "strides": [[1, 1], [2, 2], ...], ...},
     "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

:func:`build_nnunet_network` rebuilds it as nnU-Net's ``get_network_from_plans`` does (the keys named
by ``_kw_requires_import`` are dotted names of classes, resolved here), with the input channels and
classes as arguments; deep supervision is off (inference and distillation use the full-resolution
output). Only the U-Nets of ``dynamic_network_architectures.architectures.unet`` are accepted
(:data:`NNUNET_CLASSES`, looked up by the class name's last part, as nnU-Net falls back to when a
module moved), and the imported names must be classes under ``torch.nn`` or
``dynamic_network_architectures``.

In medkd checkpoints the architecture is a :class:`~medkd.models.ModelSpec` named ``nnunet`` whose
``kwargs`` are ``{"network_class_name", "arch_kwargs", "kw_requires_import"}``; without them the
builder makes nnU-Net's default 5-stage PlainConvUNet (32..320 features), and ``shrink`` scales
``features_per_stage`` like every other registry model (a student of nnU-Net's architecture).
``dynamic-network-architectures`` is the optional extra ``medkd[nnunet]``, imported only here and
only when such a network is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from medkd.models.registry import ModelSpec, register_model, scale_channels

__all__ = ["NNUNET_CLASSES", "NnunetArchitectureError", "build_nnunet_network", "default_architecture"]

#: accepted network classes (last part of ``network_class_name``) -> module of dynamic-network-architectures
NNUNET_CLASSES: dict[str, str] = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet",
}
_IMPORT_PREFIXES = ("torch.nn.", "dynamic_network_architectures.")
INSTALL_HINT = ("install the optional extra: pip install --no-deps dynamic-network-architectures==0.4.4 einops "
                "(see README, 'nnU-Net teachers')")


class NnunetArchitectureError(ValueError):
    """An nnU-Net architecture entry cannot be built; the message starts with the key of the entry."""


def _locate(dotted: str, key: str) -> type:
    """The class ``dotted`` (e.g. ``torch.nn.modules.conv.Conv2d``), only under :data:`_IMPORT_PREFIXES`."""
    if not isinstance(dotted, str) or not dotted.startswith(_IMPORT_PREFIXES) or "." not in dotted:
        raise NnunetArchitectureError(f"arch_kwargs.{key}: {dotted!r} is not a class under "
                                      f"{' or '.join(p.rstrip('.') for p in _IMPORT_PREFIXES)}")
    module_name, _, name = dotted.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        found = None
    if not isinstance(found, type):
        raise NnunetArchitectureError(f"arch_kwargs.{key}: cannot import class {dotted!r}")
    return found


def network_class(network_class_name: str) -> type:
    """The dynamic-network-architectures class of a plans ``network_class_name`` (by its last part)."""
    short = str(network_class_name).rpartition(".")[2]
    if short not in NNUNET_CLASSES:
        raise NnunetArchitectureError(f"network_class_name: unknown network class "
                                      f"{network_class_name!r}; supported: {', '.join(NNUNET_CLASSES)}")
    try:
        module = importlib.import_module(NNUNET_CLASSES[short])
    except ImportError as err:
        raise NnunetArchitectureError(f"the nnU-Net network {short} needs dynamic-network-architectures ({err}); "
                                      f"{INSTALL_HINT}") from None
    return getattr(module, short)


def build_nnunet_network(network_class_name: str, arch_kwargs: dict[str, Any], kw_requires_import: list[str],
                         in_channels: int, num_classes: int) -> nn.Module:
    """The network of an nnU-Net ``architecture`` entry, deep supervision off.

    Returns a module mapping ``(B, in_channels, *spatial)`` to logits ``(B, num_classes, *spatial)``;
    spatial sizes must be divisible by the product of ``arch_kwargs["strides"]`` per axis.
    """
    cls = network_class(network_class_name)
    if not isinstance(arch_kwargs, dict):
        raise NnunetArchitectureError(f"arch_kwargs must be an object, got {type(arch_kwargs).__name__}")
    kwargs = dict(arch_kwargs)
    for key in kw_requires_import:
        if key not in kwargs:
            raise NnunetArchitectureError(f"_kw_requires_import names {key!r}, absent from arch_kwargs")
        if kwargs[key] is not None:
            kwargs[key] = _locate(kwargs[key], key)
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as err:
        raise NnunetArchitectureError(f"arch_kwargs do not build {cls.__name__}: {err}") from None


def default_architecture(spatial_dims: int) -> dict[str, Any]:
    """nnU-Net's default 5-stage PlainConvUNet entry for ``spatial_dims`` 2 or 3 (kernel 3, stride 2)."""
    d = spatial_dims
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
            "conv_op": f"torch.nn.modules.conv.Conv{d}d", "kernel_sizes": [[3] * d] * 5,
            "strides": [[1] * d] + [[2] * d] * 4, "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4,
            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{d}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


@register_model("nnunet")
def _build_nnunet(spec: ModelSpec) -> nn.Module:
    """nnU-Net v2 U-Net from an architecture entry (default: 5-stage PlainConvUNet, features 32..320)."""
    if spec.deep_supervision:
        raise ValueError("model 'nnunet' is built without deep supervision; use 'dynunet' for deep supervision")
    entry = spec.kwargs or default_architecture(spec.spatial_dims)
    unknown = set(entry) - {"network_class_name", "arch_kwargs", "kw_requires_import"}
    if unknown:
        raise NnunetArchitectureError(f"model 'nnunet': unknown kwargs {sorted(unknown)}")
    arch = dict(entry["arch_kwargs"])
    if spec.shrink:
        arch["features_per_stage"] = list(scale_channels(arch["features_per_stage"], spec.shrink))
    return build_nnunet_network(entry["network_class_name"], arch, list(entry.get("kw_requires_import", [])),
                                spec.in_channels, spec.out_channels)
