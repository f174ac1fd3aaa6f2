"""Segmentation networks (teacher/student presets over MONAI) and complexity measures."""

from medkd.models.complexity import count_macs, count_parameters, measure_latency
from medkd.models.registry import (
    PRESET_KWARGS,
    PRESETS,
    ModelSpec,
    create,
    create_from_spec,
    list_models,
    register_model,
    scale_channels,
)

__all__ = [
    "PRESETS",
    "PRESET_KWARGS",
    "ModelSpec",
    "count_macs",
    "count_parameters",
    "create",
    "create_from_spec",
    "list_models",
    "measure_latency",
    "register_model",
    "scale_channels",
]

# feature taps (forward hooks by module name), tracing of the tappable modules, automatic
# encoder/decoder stage discovery, and the inspect-model table
from medkd.models.inspection import format_tappable, inspect_model  # noqa: E402
from medkd.models.stages import discover_stages, stage_channels  # noqa: E402
from medkd.models.taps import FeatureTaps, TapNotFoundError  # noqa: E402
from medkd.models.tracing import list_tappable  # noqa: E402

__all__ += [
    "FeatureTaps",
    "TapNotFoundError",
    "discover_stages",
    "format_tappable",
    "inspect_model",
    "list_tappable",
    "stage_channels",
]

# whole-input forward: zero-pad to a multiple of the largest stride, crop back
from medkd.models.padding import forward_padded, largest_stride  # noqa: E402

__all__ += ["forward_padded", "largest_stride"]

# nnU-Net v2 networks as registry model "nnunet" (dynamic-network-architectures, imported when one is built)
from medkd.models import nnunet as _nnunet  # noqa: E402,F401

