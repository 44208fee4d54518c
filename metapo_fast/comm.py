"""Process-group queries that are safe on one process: the world size and rank (1 and 0 when
torch.distributed is not initialised), a barrier and a sum all-reduce that are no-ops there.
Setting up the process group is ``train.parallel.init_distributed``'s job."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "barrier", "all_reduce_sum"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over the ranks (nothing on one process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t
