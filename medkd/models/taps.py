"""Feature taps: read intermediate features of any network by module name, no rewriting.

torchdistill-style forward hooks keyed by the names of :meth:`torch.nn.Module.named_modules`,
so that the unmodified MONAI networks of :mod:`medkd.models.registry` expose their encoder,
bottleneck and decoder features to distillation losses.

Example::

    from medkd.models import FeatureTaps, create, discover_stages

    teacher = create("unet", 2, 1, 4)
    student = create("unet", 2, 1, 4, preset="student")
    stages = discover_stages(teacher, spatial_dims=2, in_channels=1)
    names = stages["encoder"] + stages["bottleneck"] + stages["decoder"]
    with FeatureTaps(teacher, names, detach=True) as t_taps, FeatureTaps(student, names) as s_taps:
        teacher(x), student(x)
        pairs = list(zip(s_taps.get(), t_taps.get()))   # same stage, different widths

Teacher and student presets differ only in widths, so :func:`discover_stages` returns the
same names for both and taps can be paired stage by stage.

Helpers for inspection (used by ``medkd inspect-model NAME``): :func:`list_tappable`,
:func:`format_tappable` and :func:`inspect_model`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:  # rich is imported lazily: only the CLI needs it
    from rich.table import Table

__all__ = [
    "FeatureTaps",
    "TapNotFoundError",
    "discover_stages",
    "format_tappable",
    "inspect_model",
    "list_tappable",
    "stage_channels",
]

#: default isotropic dummy input size of :func:`discover_stages` per number of spatial dims.
DEFAULT_INPUT_SIZE: dict[int, int] = {1: 256, 2: 64, 3: 32}

_INSPECT_HINT = "Run `medkd inspect-model NAME` (or medkd.models.taps.list_tappable) to list tappable modules."


class TapNotFoundError(KeyError):
    """A requested module name does not exist in the model (a :class:`KeyError`)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message (escaped, quoted)
        return str(self.args[0]) if self.args else ""


def _first_tensor(value: Any) -> Tensor | None:
    """``value`` itself if a tensor, else the first tensor of a tuple/list (or dict values), else ``None``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None


def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Every valid dotted path (shared modules under all their names), root as ``""``."""
    return dict(model.named_modules(remove_duplicate=False))


def _unknown_name_error(model: nn.Module, name: str) -> TapNotFoundError:
    candidates = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if not close:  # e.g. a missing prefix such as "module." or a dropped ".submodule"
        close = [n for n in candidates if n.endswith(name) or name.endswith(n)][:5]
    hint = f" Did you mean {close}?" if close else ""
    return TapNotFoundError(
        f"{type(model).__name__} has no module named {name!r}.{hint} {_INSPECT_HINT}"
    )


class FeatureTaps:
    """Forward hooks on modules named by ``model.named_modules()`` names; captures their outputs.

    Args:
        model: the root module whose forward passes are observed.
        names: dotted module names (as printed by ``model.named_modules()`` or
            ``medkd inspect-model``); ``""`` taps the model output itself.
        detach: store ``output.detach()`` (e.g. for a frozen teacher). With ``detach=False``
            the captured tensors stay in the autograd graph, so a loss on them backpropagates
            into the parameters that produced them.

    After each forward of ``model``, :attr:`features` maps every tapped name to the output of
    that module. The dict is replaced by a fresh one at the start of every forward of the root
    model (a forward pre-hook), so features never leak from one step into the next, and a dict
    obtained earlier keeps the features of its own step. Output conventions:

    * a module returning a tuple/list (or dict) is tapped at its first tensor;
    * a module called several times in one forward keeps the output of its last call;
    * a module returning no tensor is not recorded (:meth:`get` then raises).

    Use as a context manager, or call :meth:`remove` to detach every hook.

    Raises:
        TapNotFoundError: (a ``KeyError``) an unknown name; the message lists close matches.
        ValueError: empty or duplicated names.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("FeatureTaps needs at least one module name.")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Module names given more than once: {dupes}.")
        table = _module_table(model)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"Module names must be strings, got {name!r}.")
            if name not in table:
                raise _unknown_name_error(model, name)
        self.model = model
        self.names: list[str] = names
        self.detach = bool(detach)
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._reset)]
        for name in names:
            self._handles.append(table[name].register_forward_hook(self._make_hook(name)))

    def _reset(self, module: nn.Module, args: Any) -> None:
        self.features = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                self.features[name] = tensor.detach() if self.detach else tensor

        return hook

    @property
    def active(self) -> bool:
        """``False`` once :meth:`remove` has been called."""
        return bool(self._handles)

    def get(self, names: Sequence[str] | None = None) -> list[Tensor]:
        """Captured features of the last forward, in the order of ``names`` (default: all taps).

        Raises:
            KeyError: a name that is not tapped by this object.
            RuntimeError: a tap that did not fire during the last forward (or no forward yet).
        """
        if isinstance(names, str):
            names = [names]
        wanted = self.names if names is None else list(names)
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise TapNotFoundError(f"Not tapped: {unknown}; tapped modules are {self.names}.")
        missing = [n for n in wanted if n not in self.features]
        if missing:
            state = "" if self.active else " The hooks were removed."
            raise RuntimeError(
                f"Taps {missing} did not capture a tensor in the last forward of "
                f"{type(self.model).__name__}: run a forward pass first; the module may be unused in "
                f"this mode or return no tensor.{state}"
            )
        return [self.features[n] for n in wanted]

    def remove(self) -> None:
        """Remove every hook (idempotent); :attr:`features` keeps the last capture."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return f"FeatureTaps({type(self.model).__name__}, names={self.names}, detach={self.detach})"


# ----------------------------------------------------------------------------- tracing


@dataclass
class _Call:
    """One recorded module call (first call of each module), in completion order."""

    index: int
    name: str
    type: str
    out: Tensor
    inputs: list[Tensor]
    stride: tuple[int | float, ...] | None
    in_stride: tuple[int | float, ...] | None
    cat_of_input: bool  # output = cat(first input, something) along channels (a skip wrapper)
    ancestors: tuple[str, ...]  # names of the module calls this call ran inside (dynamic nesting)

    @property
    def depth(self) -> int:
        return self.name.count(".")

    @property
    def level(self) -> float:
        return math.prod(self.stride) if self.stride else 1.0


def _axis_stride(a: int, b: int) -> int | float:
    return a // b if b and a % b == 0 else round(a / b, 6)


def _stride(reference: Sequence[int], tensor: Tensor | None) -> tuple[int | float, ...] | None:
    if tensor is None or tensor.dim() != len(reference) + 2 or any(s < 1 for s in tensor.shape[2:]):
        return None
    return tuple(_axis_stride(int(a), int(b)) for a, b in zip(reference, tensor.shape[2:]))


def _tensors_in(values: Any) -> list[Tensor]:
    found: list[Tensor] = []
    stack = [values]
    while stack:
        value = stack.pop(0)
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            stack[:0] = list(value)
        elif isinstance(value, dict):
            stack[:0] = list(value.values())
    return found


def _is_cat_of(output: Tensor, first: Tensor | None) -> bool:
    if first is None or first.dim() != output.dim() or output.dim() < 3:
        return False
    if first.shape[0] != output.shape[0] or first.shape[2:] != output.shape[2:]:
        return False
    c = first.shape[1]
    if output.shape[1] <= c:
        return False
    return bool(torch.equal(output[:, :c], first) or torch.equal(output[:, -c:], first))


def _example_input(model: nn.Module, shape: Sequence[int]) -> Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)  # random, not zeros: makes tensor content checks unambiguous
    return torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError as err:
        raise TypeError(
            f"input_shape must be a sequence of ints (B, C, *spatial), got {input_shape!r}."
        ) from err
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (B, C, *spatial) with positive sizes, got {tuple(input_shape)}."
        )
    return shape


def _trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[_Call], Tensor, Tensor | None]:
    """One eval-mode, no-grad forward recording every named module's first call.

    Returns ``(calls, input, output)``; all tensors are kept alive so identities are unique.
    Each module's training flag is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    shape = _check_shape(input_shape)
    x = _example_input(model, shape)
    spatial = shape[2:]
    calls: list[_Call] = []
    seen: set[str] = set()
    stack: list[str] = []  # names of the module calls in progress

    def make_pre_hook(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            stack.append(name)

        return pre_hook

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if stack and stack[-1] == name:
                stack.pop()
            out = _first_tensor(output)
            if out is None or name in seen:
                return
            seen.add(name)
            inputs = _tensors_in((args, kwargs))
            first = inputs[0] if inputs else None
            calls.append(
                _Call(
                    index=len(calls),
                    name=name,
                    type=type(module).__name__,
                    out=out,
                    inputs=inputs,
                    stride=_stride(spatial, out),
                    in_stride=_stride(spatial, first),
                    cat_of_input=_is_cat_of(out, first),
                    ancestors=tuple(stack),
                )
            )

        return hook

    modes = {m: m.training for m in model.modules()}
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
    try:
        model.eval()
        with torch.no_grad():
            try:
                output = model(x)
            except Exception as err:
                raise RuntimeError(
                    f"Forward of {type(model).__name__} on a dummy input of shape {shape} failed "
                    f"(input_shape must be (B, C, *spatial) and suit the model, e.g. spatial sizes "
                    f"divisible by 16): {err}"
                ) from err
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return calls, x, _first_tensor(output)


# ----------------------------------------------------------------------------- inspection


def _rows(calls: list[_Call]) -> list[dict]:
    return [
        {
            "name": c.name,
            "type": c.type,
            "shape": tuple(int(s) for s in c.out.shape[1:]),
            "channels": int(c.out.shape[1]) if c.out.dim() >= 2 else None,
            "stride": c.stride,
        }
        for c in calls
    ]


def list_tappable(model: nn.Module, input_shape: Sequence[int]) -> list[dict]:
    """Every named module that returns a tensor, found by one forward on a dummy input.

    The forward runs in eval mode under :func:`torch.no_grad` (each module's train/eval flag is
    restored afterwards) on a random input of ``input_shape = (B, C, *spatial)``.

    Returns:
        One row per module, in execution (completion) order: a container comes right after its
        children. Keys: ``"name"`` (for :class:`FeatureTaps`), ``"type"`` (class name),
        ``"shape"`` (output shape without batch), ``"channels"`` (``shape[0]``) and ``"stride"``:
        input spatial size / output spatial size per axis (ints when exact, else floats, so
        ``0.5`` means 2x upsampled); ``None`` for non-spatial outputs. Modules returning a
        tuple/list are described by their first tensor; a module called several times is
        described by its first call; the root module itself is not listed.
    """
    calls, _, _ = _trace(model, input_shape)
    return _rows(calls)


def _dummy_shape(
    spatial_dims: int, in_channels: int, input_size: int | Sequence[int] | None
) -> tuple[int, ...]:
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


def _pick_stages(calls: list[_Call], x: Tensor, output: Tensor | None) -> dict[str, list[str]]:
    """The stage-selection rule of :func:`discover_stages` on a trace."""
    spatial = [c for c in calls if c.stride is not None and c.out.shape[0] == x.shape[0]]
    if not spatial:
        raise ValueError("No module returned a spatial feature map; cannot discover stages.")

    # 1. the segmentation head: the outermost module returning the model output whose whole
    #    subtree stays at the output resolution (e.g. a final 1x1 conv, UNet's last up block).
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

    # 2. phases: descending until the stride first decreases after reaching its deepest value.
    peak = max(c.level for c in cands)
    first_peak = next(i for i, c in enumerate(cands) if c.level == peak)
    split = next((i for i in range(first_peak, len(cands)) if cands[i].level < peak), len(cands))
    descending, ascending = cands[:split], cands[split:]
    split_index = ascending[0].index if ascending else math.inf
    producer: dict[int, _Call] = {}
    for c in calls:
        producer.setdefault(id(c.out), c)

    # 3. modules that are not stage outputs.
    transitions = [c for c in calls if c.stride and c.in_stride and c.stride != c.in_stride]

    def input_side(c: _Call) -> bool:
        """Inside a resolution-changing block, at that block's input resolution (e.g. a 1x1 conv
        that precedes an upsampling, inside the up block)."""
        return any(t.name in c.ancestors and c.stride == t.in_stride for t in transitions)

    def skip_wrapper(c: _Call, phase_ascending: bool) -> bool:
        """A module that merges a skip connection around a sub-network: it concatenates its input
        to its output (MONAI ``SkipConnection``), or, in the ascending phase, its input comes from
        the descending phase at the same or a finer resolution (U-shaped containers)."""
        if c.cat_of_input:
            return True
        if not phase_ascending or not c.inputs:
            return False
        first = c.inputs[0]
        src = producer.get(id(first))
        from_descent = first is x or (src is not None and src.index < split_index)
        return from_descent and c.in_stride is not None and math.prod(c.in_stride) <= c.level

    def consumed(c: _Call) -> bool:
        """Output read by a later module (as any input, or concatenated into a later output) or
        returned by the model; auxiliary heads (deep supervision) are not consumed."""
        if output is not None and c.out is output:
            return True
        for d in calls[c.index + 1 :]:
            if any(t is c.out for t in d.inputs):
                return True
        n = c.out.shape[1]
        for d in calls[c.index + 1 :]:
            o = d.out
            if o.dim() == c.out.dim() and o.shape[2:] == c.out.shape[2:] and o.shape[1] > n:
                if torch.equal(o[:, :n], c.out) or torch.equal(o[:, -n:], c.out):
                    return True
        return False

    def choose(group: list[_Call], phase_ascending: bool) -> _Call | None:
        ok = [c for c in group if not input_side(c) and not skip_wrapper(c, phase_ascending)]
        if not ok:
            return None
        used = [c for c in ok if consumed(c)]
        return (used or ok)[-1]

    def grouped(seq: list[_Call]) -> dict[tuple, list[_Call]]:
        groups: dict[tuple, list[_Call]] = {}
        for c in seq:
            groups.setdefault(c.stride, []).append(c)
        return groups

    # descending: a module counts for its level only before the stride first exceeds that level
    monotone: list[_Call] = []
    running = 0.0
    for c in descending:
        if c.level >= running:
            running = c.level
            monotone.append(c)
    encoder: list[_Call] = []
    bottleneck: list[_Call] = []
    for stride, group in sorted(grouped(monotone).items(), key=lambda kv: (math.prod(kv[0]), kv[1][0].index)):
        pick = choose(group, phase_ascending=False)
        if pick is not None:
            (bottleneck if math.prod(stride) == peak else encoder).append(pick)
    decoder: list[_Call] = []
    asc_groups = grouped([c for c in ascending if c.level < peak])
    for _, group in sorted(asc_groups.items(), key=lambda kv: (-math.prod(kv[0]), kv[1][0].index)):
        pick = choose(group, phase_ascending=True)
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
    shape = _dummy_shape(spatial_dims, in_channels, input_size)
    calls, x, output = _trace(model, shape)
    stages = _pick_stages(calls, x, output)
    if not stages["bottleneck"] or (not stages["encoder"] and not stages["decoder"]):
        raise ValueError(
            f"Could not discover stages of {type(model).__name__} at input shape {shape}: the model "
            f"does not appear to downsample its input. {_INSPECT_HINT}"
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
    table = _module_table(model)
    for name in names:
        if name not in table:
            raise _unknown_name_error(model, name)
    shape = _dummy_shape(spatial_dims, in_channels, input_size)
    with FeatureTaps(model, list(names), detach=True) as taps:
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(_example_input(model, shape))
        finally:
            for module, mode in modes.items():
                module.training = mode
        missing = [n for n in names if n not in taps.features]
        if missing:
            raise RuntimeError(
                f"Modules {missing} returned no tensor during a forward at input shape {shape}."
            )
        return [int(t.shape[1]) for t in taps.get(list(names))]


def inspect_model(
    name: str,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 4,
    preset: str = "teacher",
    input_size: int | Sequence[int] | None = None,
) -> tuple[list[dict], dict[str, list[str]]]:
    """Build registry model ``name`` and return ``(list_tappable rows, discover_stages result)``.

    Backs the ``medkd inspect-model NAME`` command; render with ``format_tappable(rows, stages)``.
    """
    from medkd.models.registry import create

    model = create(name, spatial_dims, in_channels, out_channels, preset=preset)
    shape = _dummy_shape(spatial_dims, in_channels, input_size)
    calls, x, output = _trace(model, shape)
    rows = _rows(calls)
    return rows, _pick_stages(calls, x, output)


def _format_stride(stride: Sequence[int | float] | None) -> str:
    if stride is None:
        return "-"
    parts = [str(s) for s in stride]
    return parts[0] if len(set(parts)) == 1 else "x".join(parts)


def format_tappable(rows: Sequence[dict], stages: dict[str, list[str]] | None = None) -> Table:
    """A :class:`rich.table.Table` of :func:`list_tappable` rows.

    Args:
        rows: rows from :func:`list_tappable` / :func:`inspect_model`.
        stages: optional :func:`discover_stages` result; adds a ``stage`` column such as
            ``encoder[0]``, ``bottleneck`` or ``decoder[2]`` and highlights those rows.
    """
    from rich.table import Table

    labels: dict[str, str] = {}
    for kind, names in (stages or {}).items():
        for i, n in enumerate(names):
            labels[n] = kind if kind == "bottleneck" else f"{kind}[{i}]"
    table = Table(title="Tappable modules (execution order)")
    table.add_column("#", justify="right", style="dim")
    table.add_column("name", overflow="fold")
    table.add_column("type")
    table.add_column("channels", justify="right")
    table.add_column("shape")
    table.add_column("stride", justify="right")
    if stages is not None:
        table.add_column("stage")
    for i, row in enumerate(rows):
        cells = [
            str(i),
            row["name"],
            row["type"],
            "-" if row.get("channels") is None else str(row["channels"]),
            "x".join(str(s) for s in row["shape"]),
            _format_stride(row.get("stride")),
        ]
        if stages is not None:
            cells.append(labels.get(row["name"], ""))
        table.add_row(*cells, style="bold" if row["name"] in labels else None)
    return table
