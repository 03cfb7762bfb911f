"""Small torch.distributed helpers that degrade to no-ops without a process group."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, TypeVar

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


def all_gather_object(obj: Any, *, pg: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out


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


T = TypeVar("T")


class Rank0Error(RuntimeError):
    """What rank 0's action raised, re-raised on the other ranks by :func:`on_rank0`.

    Attributes:
        cause_type: The class name of rank 0's exception.
    """

    def __init__(self, message: str, *, cause_type: str) -> None:
        super().__init__(message)
        self.cause_type = cause_type


def on_rank0(fn: Callable[[], T], *, pg: Any = None, what: str) -> T:
    """Rank 0 runs ``fn()``; every rank gets its result or its error.

    The one pattern for I/O that only rank 0 does between collectives (begin,
    commit, the restore target...): the outcome is broadcast whatever it is,
    so an error on rank 0 never leaves the others waiting in a collective
    until the group's timeout. Rank 0 re-raises its own exception; the other
    ranks raise :class:`Rank0Error` naming it. Collective: call on every rank.

    Args:
        fn: The action (runs on rank 0 only).
        pg: The group to broadcast on (a gloo group: the payload is a Python object).
        what: What ``fn`` does, for the error message ("commit of s3://...").
    """
    if not initialized():
        return fn()
    outcome: tuple[Any, ...] | None = None
    error: BaseException | None = None
    if rank(pg) == 0:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - every rank must learn it
            error = e
            outcome = ("error", type(e).__name__, str(e))
    outcome = broadcast_object(outcome, pg=pg)
    assert outcome is not None
    if outcome[0] == "ok":
        return outcome[1]
    if error is not None:
        raise error
    raise Rank0Error(f"{what} failed on rank 0: {outcome[1]}: {outcome[2]}", cause_type=outcome[1])


def with_retries(fn: Callable[[], T], *, attempts: int, backoff_s: float, what: str,
                 log: Callable[..., None] | None = None, give_up: tuple[type[Exception], ...] = ()) -> T:
    """``fn()`` retried ``attempts`` times in all, sleeping ``backoff_s * 2**i`` between tries.

    ``fn`` must fail on every rank alike (use :func:`on_rank0` or agree on
    the outcome inside it), so that all ranks retry together; the last error
    is raised. Errors of a ``give_up`` type (also when rank 0 raised one,
    seen elsewhere as a :class:`Rank0Error`) are raised at once.
    """
    names = {t.__name__ for t in give_up}
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - retried, then raised
            if i == attempts - 1 or isinstance(e, give_up) or getattr(e, "cause_type", None) in names:
                raise
            if log is not None:
                log("%s failed (try %d of %d), retrying in %.1fs: %s", what, i + 1, attempts, backoff_s * 2**i, e)
            time.sleep(backoff_s * 2**i)
    raise AssertionError("unreachable")
