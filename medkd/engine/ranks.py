"""What the ranks of a distributed (DDP) run must agree on, and the proof that they did.

Fabric starts the processes (its own launcher for ``--devices N`` on one machine, or torchrun / SLURM
``srun``, which start every rank themselves); these helpers run inside them:

* :func:`agree_on_run_dir`: every rank uses rank 0's run folder (a default name holds a time stamp and
  a random part, so ranks started apart would otherwise each name another folder);
* :func:`weight_digests`: a SHA-256 of each rank's trainable parameters, gathered on every rank, so a run
  records that its ranks ended with bit-identical weights (``result.json``: ``rank_weight_sha256``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch import nn


def agree_on_run_dir(fabric: Fabric, run_dir: Path) -> Path:
    """Rank 0's ``run_dir`` on every rank (unchanged in a single-process run)."""
    if fabric.world_size == 1:
        return run_dir
    return Path(fabric.broadcast(str(run_dir), src=0))


def parameter_digest(modules: list[nn.Module]) -> str:
    """SHA-256 of the bytes of every parameter of ``modules`` (in order, on the CPU)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_digests(fabric: Fabric, modules: list[nn.Module]) -> list[str]:
    """Every rank's :func:`parameter_digest`, in rank order (a collective: every rank must call it)."""
    own = parameter_digest(modules)
    if fabric.world_size == 1:
        return [own]
    codes = torch.tensor(list(bytes.fromhex(own)), dtype=torch.int32, device=fabric.device)
    gathered = fabric.all_gather(codes).reshape(fabric.world_size, -1).cpu()
    return [bytes(row.tolist()).hex() for row in gathered]
