"""What a training step costs on a CPU, estimated from the network's multiply-accumulates (MACs).

A fully convolutional network's MACs and activations grow linearly with the voxels of its input
(when every axis is a multiple of its total stride), so they are counted once per voxel on an input
of twice the total stride (instance norm needs 2 voxels at the bottleneck), on PyTorch's ``meta``
device (shapes only), and scaled: ``forward MACs = macs_per_voxel * prod(patch) * batch``.
A training step (forward + backward) costs about ``3 x`` the forward MACs; its time is those MACs
over the CPU's training throughput :attr:`Budget.train_macs_per_s`. Memory: every module output is
kept for the backward pass, ``4 bytes * activations_per_voxel * voxels * batch``, plus weights,
gradients and AdamW's two moments (``16 bytes * parameters``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn

from medkd.models import create
from medkd.models.complexity import count_macs, count_parameters, torch_threads

#: training throughput of one CPU thread in forward-MAC equivalents x 3 (forward + backward): 20 GMAC/s was
#: measured on medkd's 3D UNet teacher with an idle core, but whole training steps of planned 2D and 3D teachers
#: ran at 8-12 (data loading, small layers, a busy machine): planning at 20 gave ACDC's 2D teacher 605 steps in
#: 12 minutes where 2,000 were planned (benchmarks/default_teacher.py). ``medkd plan --measure`` measures it.
DEFAULT_GMACS_PER_THREAD = 8.0
BACKWARD_FACTOR = 3.0  # forward + backward ~ 3 forward passes


@dataclass(frozen=True)
class Budget:
    """A compute and memory budget: at least ``min_steps`` training steps of the teacher in ``minutes`` on
    ``threads`` CPU threads (each ``gmacs_per_thread`` GMAC/s, ``thread_efficiency`` of it used when several),
    in at most ``memory_gb`` of memory."""

    minutes: float = 10.0
    min_steps: int = 4000
    threads: int = 2
    gmacs_per_thread: float = DEFAULT_GMACS_PER_THREAD
    thread_efficiency: float = 0.75
    memory_gb: float = 4.0

    def __post_init__(self) -> None:
        for key in ("minutes", "min_steps", "threads", "gmacs_per_thread", "memory_gb"):
            if not getattr(self, key) > 0:
                raise ValueError(f"budget {key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.thread_efficiency <= 1:
            raise ValueError(f"budget thread_efficiency must be in (0, 1], got {self.thread_efficiency!r}")

    @property
    def step_seconds(self) -> float:
        """The longest a teacher step may take: ``minutes * 60 / min_steps``."""
        return self.minutes * 60.0 / self.min_steps

    @property
    def train_macs_per_s(self) -> float:
        """Training throughput in forward MACs per second (already divided by the backward factor)."""
        efficiency = 1.0 if self.threads == 1 else self.thread_efficiency
        return self.gmacs_per_thread * 1e9 * self.threads * efficiency / BACKWARD_FACTOR

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NetworkCost:
    """Per-voxel forward MACs and stored activations, and the parameter count, of one network."""

    macs_per_voxel: float
    activations_per_voxel: float
    parameters: int

    def step_seconds(self, patch: Sequence[int], batch: int, budget: Budget) -> float:
        return self.macs_per_voxel * math.prod(patch) * batch / budget.train_macs_per_s

    def memory_gb(self, patch: Sequence[int], batch: int) -> float:
        return (4.0 * self.activations_per_voxel * math.prod(patch) * batch + 16.0 * self.parameters) / 1024 ** 3


def unet_channels(num_stages: int, spatial_dims: int) -> tuple[int, ...]:
    """nnU-Net's widths: 32 doubling per stage, at most 320 (3D) or 512 (2D)."""
    cap = 320 if spatial_dims == 3 else 512
    return tuple(min(cap, 32 * 2 ** i) for i in range(num_stages))


def _activation_elements(model: nn.Module, shape: tuple[int, ...]) -> int:
    total = [0]

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        if torch.is_tensor(output):
            total[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@lru_cache(maxsize=256)
def unet_cost(spatial_dims: int, in_channels: int, num_classes: int, channels: tuple[int, ...],
              strides: tuple[tuple[int, ...], ...], shrink: int) -> NetworkCost:
    """Cost of medkd's ``unet`` with these (teacher) widths and per-axis strides at width ``shrink``."""
    with torch.device("meta"):  # shapes only: no weights are allocated, no voxels computed
        model = create("unet", spatial_dims, in_channels, num_classes, shrink=shrink, channels=channels,
                       strides=strides)
    edges = [2 * math.prod(s[axis] for s in strides) for axis in range(spatial_dims)]  # bottleneck of 2 voxels
    shape = (1, in_channels, *edges)
    voxels = math.prod(edges)
    return NetworkCost(count_macs(model, shape) / voxels, _activation_elements(model, shape) / voxels,
                       count_parameters(model))


def measure_gmacs_per_thread(threads: int = 1, steps: int = 3) -> float:
    """This machine's training throughput now, in GMAC/s per thread (the unit of :attr:`Budget.gmacs_per_thread`):
    ``steps`` AdamW steps of medkd's 3D UNet teacher on a batch of 2 x 16 x 64 x 64 (after one warm-up step)."""
    model = create("unet", 3, 1, 4)
    shape = (2, 1, 16, 64, 64)
    macs = count_macs(model, (1, *shape[1:])) * shape[0]
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(shape), torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    with torch_threads(threads):
        model.train()
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    efficiency = 1.0 if threads == 1 else Budget.thread_efficiency
    return BACKWARD_FACTOR * macs / min(times[1:]) / 1e9 / (threads * efficiency)
