"""Segmentation networks (teacher/student presets over MONAI) and complexity measures."""

from medkd.models.complexity import count_macs, count_parameters, measure_latency
from medkd.models.registry import (
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

# feature taps (forward hooks by module name) and automatic encoder/decoder stage discovery
from medkd.models.taps import (  # noqa: E402
    FeatureTaps,
    TapNotFoundError,
    discover_stages,
    format_tappable,
    inspect_model,
    list_tappable,
    stage_channels,
)

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
