"""Process-group helpers that degrade to no-ops in a single process."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if _dist_on() else 1


def get_rank() -> int:
    """Global rank of this process (0 without a group)."""
    return dist.get_rank() if _dist_on() else 0


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; nothing to wait for in a single process."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Gather a picklable object from every rank; returns ``[obj]`` in a single process."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list | None:
    """Gather a picklable object from every rank on rank ``dst`` (others get None); ``[obj]`` in one process."""
    if get_world_size() == 1:
        return [obj]
    out: list | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a new tensor); ``t`` itself in one process."""
    if get_world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s object on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
