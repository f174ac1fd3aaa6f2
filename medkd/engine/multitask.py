"""Multi-task teachers: segmentation plus an auxiliary image reconstruction from the shared encoder.

Following the contrastive-distillation paper (arXiv 2406.03173), a teacher trained to also
reconstruct its input keeps richer image content in its encoder features, which is what feature
distillation transfers. The implementation is backbone-agnostic: the registry network is not
rewritten. A forward hook (:class:`medkd.models.taps.FeatureTaps`) reads one stage by module name
(default: the bottleneck found by :func:`medkd.models.taps.discover_stages`) and a small
:class:`ReconstructionHead` decodes it back to the image::

    image x (B, C_in, *S) --network--> logits (B, K, *S)          (segmentation, deployed)
              |
              +-- tapped stage f (B, C_f, *S / s) --head--> x_hat (B, C_in, *S)   (training only)

    loss = seg_loss(logits, y) + aux_weight * mean((x_hat - x)^2)

Tapping the bottleneck (not a decoder stage) matters for U-Nets: their skip connections would
make reconstruction from a decoder stage trivial. The head lives in
:meth:`MultiTaskTask.extra_modules`, so it is checkpointed as ``extra_state`` and the checkpoint's
``state_dict`` is the plain segmentation network: a multi-task teacher loads, predicts and teaches
exactly like any other teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medkd.engine.tasks import SupervisedTask
from medkd.models import FeatureTaps, TapNotFoundError, discover_stages, list_tappable

__all__ = ["DEFAULT_AUX_WEIGHT", "MultiTaskTask", "ReconstructionHead", "check_tap", "multitask_task_factory"]

#: default weight of the reconstruction term (the segmentation term has weight 1).
DEFAULT_AUX_WEIGHT = 0.5


def _upsampling_steps(stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-step scale factors that undo ``stride`` by factors of 2 (an axis stops once undone).

    Example: ``stride=(4, 16)`` gives ``[(2, 2), (2, 2), (1, 2), (1, 2)]``.
    """
    bad = [s for s in stride if int(s) != s or s < 1 or int(s) & (int(s) - 1)]
    if bad:
        raise ValueError(f"the tapped stage's stride must be a power of 2 per axis, got {tuple(stride)}; "
                         "tap another module (see `medkd inspect-model`)")
    logs = [int(math.log2(int(s))) for s in stride]
    return [tuple(2 if log > step else 1 for log in logs) for step in range(max(logs))]


class ReconstructionHead(nn.Module):
    """Decode a feature map of stride ``stride`` back to an image at full resolution.

    Per factor 2 of the stride: 3x3(x3) conv + instance norm + LeakyReLU + upsampling (bilinear /
    trilinear); the width halves each step (at least ``min_channels``). A final 1x1 conv maps to
    ``out_channels`` (the image's channels), with no activation (images are z-scored, not bounded).

    Args:
        in_channels: channels ``C_f`` of the tapped feature map.
        out_channels: channels ``C_in`` of the image to reconstruct.
        stride: per-axis stride of the feature map w.r.t. the image (powers of 2, e.g. ``(16, 16)``).
        spatial_dims: 2 or 3.
        min_channels: floor of the hidden widths.

    Shapes:
        ``(B, C_f, *S / stride) -> (B, C_in, *S)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], spatial_dims: int,
                 min_channels: int = 8) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(stride) != spatial_dims:
            raise ValueError(f"stride {tuple(stride)} needs {spatial_dims} entries (one per spatial axis)")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got in={in_channels}, out={out_channels}")
        self.stride = tuple(int(s) for s in stride)
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        layers: list[nn.Module] = []
        width = in_channels
        for scale in _upsampling_steps(stride):
            hidden = max(min_channels, width // 2)
            layers.append(Convolution(spatial_dims, width, hidden, kernel_size=3, act=("leakyrelu", {"inplace": True}),
                                      norm=("instance", {"affine": True})))
            layers.append(nn.Upsample(scale_factor=scale, mode=mode, align_corners=False))
            width = hidden
        layers.append(Convolution(spatial_dims, width, out_channels, kernel_size=1, conv_only=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def _tap_geometry(network: nn.Module, tap: str | None, spatial_dims: int, in_channels: int) -> tuple[str, tuple, int]:
    """``(module name, stride per axis, channels)`` of the stage to reconstruct from (one dummy forward)."""
    if tap is None:
        tap = discover_stages(network, spatial_dims, in_channels)["bottleneck"][0]
    else:
        FeatureTaps(network, [tap]).remove()  # unknown names: TapNotFoundError with close matches
    size = 64 if spatial_dims == 2 else 32  # the dummy input size of discover_stages
    rows = {row["name"]: row for row in list_tappable(network, (1, in_channels, *([size] * spatial_dims)))}
    if tap not in rows or rows[tap]["stride"] is None:
        raise TapNotFoundError(f"module {tap!r} returns no {spatial_dims}D feature map; "
                               "choose a stage with `medkd inspect-model`")
    return tap, tuple(rows[tap]["stride"]), int(rows[tap]["channels"])


class MultiTaskTask(SupervisedTask):
    """Segmentation + auxiliary reconstruction of the input image from a tapped stage.

    Args:
        network: any registry (or other encoder-decoder) segmentation network; not modified.
        seg_loss: supervised loss ``(logits, label) -> scalar`` (deep supervision handled as in
            :class:`~medkd.engine.tasks.SupervisedTask`).
        aux_weight: weight ``w >= 0`` of the reconstruction term (default 0.5).
        tap: module name of the stage to reconstruct from (default: the bottleneck found by
            :func:`~medkd.models.taps.discover_stages`).
        spatial_dims, in_channels: default from ``network.medkd_spec`` (registry networks).

    ``forward(batch)`` with ``batch["image"]`` ``(B, C_in, *S)`` and ``batch["label"]``
    ``(B, 1, *S)`` returns ``{"loss": seg + recon, "seg": seg, "recon": recon}`` (the two terms
    detached) where ``recon = w * mean((x_hat - x)^2)`` averages over batch, channels and voxels.
    """

    def __init__(self, network: nn.Module, seg_loss: nn.Module, aux_weight: float = DEFAULT_AUX_WEIGHT,
                 tap: str | None = None, *, spatial_dims: int | None = None, in_channels: int | None = None) -> None:
        super().__init__(network, seg_loss)
        if not (isinstance(aux_weight, (int, float)) and math.isfinite(aux_weight) and aux_weight >= 0):
            raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight!r}")
        spec = getattr(network, "medkd_spec", None)
        spatial_dims = spatial_dims or getattr(spec, "spatial_dims", None)
        in_channels = in_channels or getattr(spec, "in_channels", None)
        if spatial_dims is None or in_channels is None:
            raise ValueError("spatial_dims and in_channels are needed for a network without medkd_spec")
        self.aux_weight = float(aux_weight)
        self.tap, stride, channels = _tap_geometry(network, tap, spatial_dims, in_channels)
        self.head = ReconstructionHead(channels, in_channels, stride, spatial_dims)
        self._taps = FeatureTaps(network, [self.tap])

    def reconstruct(self, image: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """``(network output, x_hat)`` for ``image`` ``(B, C_in, *S)``; ``x_hat`` has the image's shape."""
        output = self.network(image)
        recon = self.head(self._taps.get()[0])
        if recon.shape[2:] != image.shape[2:]:  # sizes not divisible by the stride
            recon = F.interpolate(recon, size=image.shape[2:], mode="bilinear" if image.dim() == 4 else "trilinear",
                                  align_corners=False)
        return output, recon

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        logits, recon = self.reconstruct(image)
        seg = self.loss(logits, batch["label"])
        rec = self.aux_weight * F.mse_loss(recon.float(), image.float())
        return {"loss": seg + rec, self.term_name: seg.detach(), "recon": rec.detach()}

    def extra_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"recon_head": self.head})


def multitask_task_factory(aux_weight: float = DEFAULT_AUX_WEIGHT, tap: str | None = None):
    """A ``task_factory`` for :class:`medkd.engine.trainer.Trainer` that trains multi-task teachers."""
    from medkd.losses import build_supervised_loss

    def factory(network: nn.Module, data, config) -> MultiTaskTask:
        return MultiTaskTask(network, build_supervised_loss(config.train.loss), aux_weight=aux_weight, tap=tap,
                             spatial_dims=config.data.spatial_dims, in_channels=data.dataset.num_channels)

    return factory


def check_tap(config, tap: str) -> None:
    """Fail early (``ValueError``) when ``tap`` names no suitable module of ``config``'s architecture.

    Builds the configured network with dummy channel counts (module names do not depend on them).
    """
    from medkd.models import create

    m = config.model
    network = create(m.name, config.data.spatial_dims, 1, 2, preset=m.preset, shrink=m.shrink,
                     deep_supervision=m.deep_supervision, **m.kwargs)
    try:
        MultiTaskTask(network, nn.Identity(), tap=tap)
    except (TapNotFoundError, ValueError) as err:
        raise ValueError(f"--aux-tap {tap}: {err}") from None
