"""Automatic encoder / bottleneck / decoder stage discovery, from one traced forward.

:func:`discover_stages` names the stage outputs of an encoder-decoder network without a
per-architecture table (the rule is in its docstring); :func:`stage_channels` measures their widths.
Teacher and student presets differ only in widths, so both get the same names and their
:class:`~medkd.models.taps.FeatureTaps` pair up stage by stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from medkd.models.taps import INSPECT_HINT, FeatureTaps, module_table, unknown_name_error
from medkd.models.tracing import ModuleCall, example_input, trace

__all__ = ["discover_stages", "stage_channels"]

#: default isotropic dummy input size of :func:`discover_stages` per number of spatial dims.
DEFAULT_INPUT_SIZE: dict[int, int] = {1: 256, 2: 64, 3: 32}


def dummy_shape(
    spatial_dims: int, in_channels: int, input_size: int | Sequence[int] | None
) -> tuple[int, ...]:
    """The ``(1, in_channels, *sizes)`` dummy input shape (default sizes: :data:`DEFAULT_INPUT_SIZE`)."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims < 1:
        raise ValueError(f"spatial_dims must be a positive int, got {spatial_dims!r}.")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")
    if input_size is None:
        input_size = DEFAULT_INPUT_SIZE.get(spatial_dims, 32)
    sizes = [input_size] * spatial_dims if isinstance(input_size, int) else list(input_size)
    if len(sizes) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"input_size must be a positive int or {spatial_dims} positive ints, got {input_size!r}."
        )
    return (1, in_channels, *sizes)


def _candidates(calls: list[ModuleCall], x: Tensor, output: Tensor | None) -> list[ModuleCall]:
    """Rule step 1: the spatial calls, less the segmentation head: the outermost module returning the
    model output whose whole subtree stays at the output resolution (e.g. a final 1x1 conv, UNet's
    last up block)."""
    spatial = [c for c in calls if c.stride is not None and c.out.shape[0] == x.shape[0]]
    if not spatial:
        raise ValueError("No module returned a spatial feature map; cannot discover stages.")
    excluded: set[str] = set()
    heads = sorted((c for c in spatial if output is not None and c.out is output), key=lambda c: c.depth)
    for head in heads:
        subtree = [c for c in spatial if c.name == head.name or head.name in c.ancestors]
        if all(c.stride == head.stride for c in subtree):
            excluded.update(c.name for c in subtree)
            break
    cands = [c for c in spatial if c.name not in excluded]
    if not cands:
        raise ValueError("Only the segmentation head returned spatial features; cannot discover stages.")
    return cands


class _Eligibility:
    """Rule step 3: which calls of a level may be its stage output (not input-side, not a skip wrapper;
    among those, preferably consumed)."""

    def __init__(self, calls: list[ModuleCall], x: Tensor, output: Tensor | None, split_index: float) -> None:
        self.calls, self.x, self.output, self.split_index = calls, x, output, split_index
        self.producer: dict[int, ModuleCall] = {}
        for c in calls:
            self.producer.setdefault(id(c.out), c)
        self.transitions = [c for c in calls if c.stride and c.in_stride and c.stride != c.in_stride]

    def input_side(self, c: ModuleCall) -> bool:
        """Inside a resolution-changing block, at that block's input resolution (e.g. a 1x1 conv
        that precedes an upsampling, inside the up block)."""
        return any(t.name in c.ancestors and c.stride == t.in_stride for t in self.transitions)

    def skip_wrapper(self, c: ModuleCall, phase_ascending: bool) -> bool:
        """A module that merges a skip connection around a sub-network: it concatenates its input
        to its output (MONAI ``SkipConnection``), or, in the ascending phase, its input comes from
        the descending phase at the same or a finer resolution (U-shaped containers)."""
        if c.cat_of_input:
            return True
        if not phase_ascending or not c.inputs:
            return False
        first = c.inputs[0]
        src = self.producer.get(id(first))
        from_descent = first is self.x or (src is not None and src.index < self.split_index)
        return from_descent and c.in_stride is not None and math.prod(c.in_stride) <= c.level

    def consumed(self, c: ModuleCall) -> bool:
        """Output read by a later module (as any input, or concatenated into a later output) or
        returned by the model; auxiliary heads (deep supervision) are not consumed."""
        if self.output is not None and c.out is self.output:
            return True
        for d in self.calls[c.index + 1 :]:
            if any(t is c.out for t in d.inputs):
                return True
        n = c.out.shape[1]
        for d in self.calls[c.index + 1 :]:
            o = d.out
            if o.dim() == c.out.dim() and o.shape[2:] == c.out.shape[2:] and o.shape[1] > n:
                if torch.equal(o[:, :n], c.out) or torch.equal(o[:, -n:], c.out):
                    return True
        return False

    def choose(self, group: list[ModuleCall], phase_ascending: bool) -> ModuleCall | None:
        ok = [c for c in group if not self.input_side(c) and not self.skip_wrapper(c, phase_ascending)]
        if not ok:
            return None
        used = [c for c in ok if self.consumed(c)]
        return (used or ok)[-1]


def _grouped(seq: list[ModuleCall]) -> dict[tuple, list[ModuleCall]]:
    groups: dict[tuple, list[ModuleCall]] = {}
    for c in seq:
        groups.setdefault(c.stride, []).append(c)
    return groups


def _monotone(descending: list[ModuleCall]) -> list[ModuleCall]:
    """A module counts for its level only before the stride first exceeds that level."""
    monotone: list[ModuleCall] = []
    running = 0.0
    for c in descending:
        if c.level >= running:
            running = c.level
            monotone.append(c)
    return monotone


def pick_stages(calls: list[ModuleCall], x: Tensor, output: Tensor | None) -> dict[str, list[str]]:
    """The stage-selection rule of :func:`discover_stages` on a trace."""
    cands = _candidates(calls, x, output)
    # 2. phases: descending until the stride first decreases after reaching its deepest value.
    peak = max(c.level for c in cands)
    first_peak = next(i for i, c in enumerate(cands) if c.level == peak)
    split = next((i for i in range(first_peak, len(cands)) if cands[i].level < peak), len(cands))
    descending, ascending = cands[:split], cands[split:]
    rule = _Eligibility(calls, x, output, ascending[0].index if ascending else math.inf)
    encoder: list[ModuleCall] = []
    bottleneck: list[ModuleCall] = []
    by_level = sorted(_grouped(_monotone(descending)).items(), key=lambda kv: (math.prod(kv[0]), kv[1][0].index))
    for stride, group in by_level:
        pick = rule.choose(group, phase_ascending=False)
        if pick is not None:
            (bottleneck if math.prod(stride) == peak else encoder).append(pick)
    decoder: list[ModuleCall] = []
    asc_groups = _grouped([c for c in ascending if c.level < peak])
    for _, group in sorted(asc_groups.items(), key=lambda kv: (-math.prod(kv[0]), kv[1][0].index)):
        pick = rule.choose(group, phase_ascending=True)
        if pick is not None:
            decoder.append(pick)
    return {
        "encoder": [c.name for c in encoder],
        "bottleneck": [c.name for c in bottleneck[-1:]],
        "decoder": [c.name for c in decoder],
    }


def discover_stages(
    model: nn.Module,
    spatial_dims: int,
    in_channels: int,
    input_size: int | Sequence[int] | None = None,
) -> dict[str, list[str]]:
    """Encoder / bottleneck / decoder stage names of an encoder-decoder network, found automatically.

    One forward on a dummy input (``64^2`` in 2D, ``32^3`` in 3D, or ``input_size``) is traced
    with :func:`list_tappable`; no per-architecture table is used. The rule:

    1. The segmentation head (the outermost module returning the model output whose modules all
       stay at the output resolution) is ignored.
    2. Modules are taken in execution (completion) order, with ``stride`` = input size / output
       size (product over axes). The *descending phase* runs until the stride first decreases
       after reaching its maximum; the rest is the *ascending phase*.
    3. Each distinct stride of the descending phase is a level (a module counts only before the
       stride first exceeds its own); the stage output of a level is the **last** eligible module
       at that stride: encoder stages for every level but the deepest, which is the bottleneck.
       In the ascending phase the last eligible module at each stride (coarser than the
       bottleneck) is a decoder stage. Post-order completion makes "last" pick the outermost
       block (a block finishes after its convolutions, norms and activations).
    4. Not eligible: modules on the input side of a resolution-changing block (e.g. the 1x1 conv
       before an upsampling inside an up block); skip-connection wrappers (modules that
       concatenate their input to their output, and ascending-phase modules whose input comes
       from the descending phase at the same or a finer resolution, e.g. MONAI ``SkipConnection``
       or DynUNet's recursive skip layers); when the level has alternatives, outputs that no later
       module reads (auxiliary heads such as deep supervision).

    Because shrinking changes only widths, a teacher and its student get the same names, so
    their taps pair up stage by stage.

    Returns:
        ``{"encoder": [high -> low resolution], "bottleneck": [name], "decoder": [low -> high
        resolution]}``, names usable with :class:`FeatureTaps`.

    Raises:
        ValueError: bad arguments, or the model never downsamples at this input size.
        RuntimeError: the dummy forward failed (e.g. input size not divisible as required).
    """
    shape = dummy_shape(spatial_dims, in_channels, input_size)
    calls, x, output = trace(model, shape)
    stages = pick_stages(calls, x, output)
    if not stages["bottleneck"] or (not stages["encoder"] and not stages["decoder"]):
        raise ValueError(
            f"Could not discover stages of {type(model).__name__} at input shape {shape}: the model "
            f"does not appear to downsample its input. {INSPECT_HINT}"
        )
    return stages


def stage_channels(
    model: nn.Module,
    names: Sequence[str],
    spatial_dims: int,
    in_channels: int,
    input_size: int | Sequence[int] | None = None,
) -> list[int]:
    """Output channels of the modules ``names`` (in that order), from one dummy forward.

    Typical use: widths of the student and teacher stages to build the projection adapters of a
    feature-distillation loss. Tuple outputs are measured at their first tensor.

    Raises:
        TapNotFoundError: an unknown name (with close matches).
        RuntimeError: a named module returned no tensor during the forward.
    """
    if isinstance(names, str):
        names = [names]
    table = module_table(model)
    for name in names:
        if name not in table:
            raise unknown_name_error(model, name)
    shape = dummy_shape(spatial_dims, in_channels, input_size)
    with FeatureTaps(model, list(names), detach=True) as taps:
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(example_input(model, shape))
        finally:
            for module, mode in modes.items():
                module.training = mode
        missing = [n for n in names if n not in taps.features]
        if missing:
            raise RuntimeError(
                f"Modules {missing} returned no tensor during a forward at input shape {shape}."
            )
        return [int(t.shape[1]) for t in taps.get(list(names))]
