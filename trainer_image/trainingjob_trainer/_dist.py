"""Small torch.distributed helpers that degrade to no-ops without a process group."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(pg: Any = None) -> int:
    """Global rank in ``pg`` (0 without a process group)."""
    return dist.get_rank(pg) if initialized() else 0


def world_size(pg: Any = None) -> int:
    """Size of ``pg`` (1 without a process group)."""
    return dist.get_world_size(pg) if initialized() else 1


def local_rank() -> int:
    """torchrun's LOCAL_RANK (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier(pg: Any = None) -> None:
    """A barrier on ``pg``; a no-op without a process group."""
    if initialized():
        dist.barrier(group=pg)


def broadcast_object(obj: Any, *, pg: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=pg)
    return box[0]


def all_reduce_max(values: list[int], *, pg: Any = None) -> list[int]:
    """Element-wise maximum of small integer vectors over all ranks."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
    return [int(v) for v in t.tolist()]


def cpu_group(pg: Any = None) -> Any:
    """``pg`` if it is gloo, else a new gloo group (collective: call on all ranks)."""
    if not initialized():
        return None
    group = pg if pg is not None else dist.group.WORLD
    if dist.get_backend(group) == dist.Backend.GLOO:
        return pg
    return dist.new_group(backend=dist.Backend.GLOO)


def new_gloo_group(pg: Any = None) -> Any:
    """A new gloo group of ``pg``'s ranks (collective: call on all ranks)."""
    if not initialized():
        return None
    ranks = None if pg is None else dist.get_process_group_ranks(pg)
    return dist.new_group(ranks=ranks, backend=dist.Backend.GLOO)
