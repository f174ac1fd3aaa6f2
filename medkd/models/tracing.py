"""Tracing: one dummy forward that records every named module's output shape and stride.

:func:`list_tappable` lists the modules a :class:`~medkd.models.taps.FeatureTaps` can tap (the
``medkd inspect-model NAME`` table); :func:`trace` keeps the recorded calls themselves (tensors, input
identities, dynamic nesting) for the stage rule of :mod:`medkd.models.stages`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from medkd.models.taps import first_tensor

__all__ = ["list_tappable"]


@dataclass
class ModuleCall:
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


def example_input(model: nn.Module, shape: Sequence[int]) -> Tensor:
    """A seeded random input of ``shape`` on the device and in the float dtype of ``model``."""
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


class _Recorder:
    """Forward (pre-)hooks that record each named module's first call returning a tensor."""

    def __init__(self, spatial: Sequence[int]) -> None:
        self.spatial = spatial
        self.calls: list[ModuleCall] = []
        self.seen: set[str] = set()
        self.stack: list[str] = []  # names of the module calls in progress

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return handles

    def _pre_hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            self.stack.append(name)

        return pre_hook

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            out = first_tensor(output)
            if out is None or name in self.seen:
                return
            self.seen.add(name)
            self.record(name, module, out, _tensors_in((args, kwargs)))

        return hook

    def record(self, name: str, module: nn.Module, out: Tensor, inputs: list[Tensor]) -> None:
        first = inputs[0] if inputs else None
        self.calls.append(
            ModuleCall(
                index=len(self.calls),
                name=name,
                type=type(module).__name__,
                out=out,
                inputs=inputs,
                stride=_stride(self.spatial, out),
                in_stride=_stride(self.spatial, first),
                cat_of_input=_is_cat_of(out, first),
                ancestors=tuple(self.stack),
            )
        )


def trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[ModuleCall], Tensor, Tensor | None]:
    """One eval-mode, no-grad forward recording every named module's first call.

    Returns ``(calls, input, output)``; all tensors are kept alive so identities are unique.
    Each module's training flag is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    shape = _check_shape(input_shape)
    x = example_input(model, shape)
    recorder = _Recorder(shape[2:])
    modes = {m: m.training for m in model.modules()}
    handles = recorder.attach(model)
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
    return recorder.calls, x, first_tensor(output)


def call_rows(calls: list[ModuleCall]) -> list[dict]:
    """The :func:`list_tappable` rows of traced calls."""
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
    calls, _, _ = trace(model, input_shape)
    return call_rows(calls)
