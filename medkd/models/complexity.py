"""Model complexity: parameter count, multiply-accumulate count and CPU latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["count_macs", "count_parameters", "measure_latency", "torch_threads"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the caller's count restored after (``None``: unchanged)."""
    old_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(old_threads)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared parameters counted once).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (B, C, *spatial) with positive sizes, got {tuple(input_shape)}.")
    return shape


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """Multiply-accumulates of one leaf layer call.

    * Conv: ``out.numel() * (in_channels / groups) * prod(kernel_size)``
    * ConvTranspose: ``in.numel() * (out_channels / groups) * prod(kernel_size)``
    * Linear: ``in_features * out.numel()``
    """
    if isinstance(module, _CONV_TRANSPOSE):
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, _CONV):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * output.numel()
    return 0


def _snapshot_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulate operations of one eval-mode forward pass on zeros of ``input_shape``.

    Counts ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` and ``Linear`` layers (see
    :func:`_layer_macs` for the formulas); norms, activations and pooling are ignored.
    The count includes the batch dimension (``B`` samples cost ``B`` times one sample).
    Hooks are removed and every submodule's training flag is restored afterwards.

    Args:
        model: the network.
        input_shape: ``(B, C, *spatial)``.
    """
    shape = _check_input_shape(input_shape)
    total = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        total[0] += _layer_macs(module, inputs, output)

    counted = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    modes = _snapshot_modes(model)
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
        _restore_modes(modes)
    return int(total[0])


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict:
    """CPU wall-clock time of one eval-mode forward pass under ``torch.inference_mode``.

    Args:
        model: the network (run on the device of its parameters).
        input_shape: ``(B, C, *spatial)``.
        warmup: untimed forward passes first.
        repeats: timed forward passes (>= 1).
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards);
            ``None`` keeps the current setting.

    Returns:
        ``{"median_ms", "mean_ms", "min_ms", "repeats", "threads"}``.
    """
    shape = _check_input_shape(input_shape)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}.")
    modes = _snapshot_modes(model)
    times_ms: list[float] = []
    try:
        with torch_threads(threads):
            model.eval()
            with torch.inference_mode():
                x = _example_input(model, shape)
                for _ in range(warmup):
                    model(x)
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    times_ms.append((time.perf_counter() - start) * 1e3)
            used_threads = torch.get_num_threads()
    finally:
        _restore_modes(modes)
    return {
        "median_ms": statistics.median(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "min_ms": min(times_ms),
        "repeats": repeats,
        "threads": used_threads,
    }
