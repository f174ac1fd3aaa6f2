"""What the trainer is set up with: the precision Fabric runs at, the optimiser, the progress bar."""

from __future__ import annotations

import torch


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: 32-true on CPU, bf16-mixed on a GPU that supports it, else 16-mixed."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if not gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW, or Nesterov SGD, from a :class:`~medkd.config.TrainConfig`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def progress_bar(total: int | None, initial: int, description: str):
    """A tqdm bar of training steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", mininterval=1.0, dynamic_ncols=True)
