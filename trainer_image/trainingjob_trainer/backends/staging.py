"""Staging buffers: the copies of the state a save uploads from.

torchsnapshot's slabs (:class:`SlabPool`) and DCP's async stager
(:func:`dcp_stager`) keep their buffers from one save to the next while the
state's layout is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

class _SlabPool:
    """Staging buffers kept from one torchsnapshot take to the next.

    A take copies its batched tensors into slabs, and, when async, each
    unbatched CPU tensor into a buffer of its own (:func:`_ts_stage_slab`,
    :func:`_ts_stage_tensor`); copying 256 MiB into new memory took 0.08 s
    here, mostly page faults, so the buffers of one take are reused by the
    next (same sizes while the state keeps its layout). A take's buffers go
    back to the pool only when its uploads are known to be over
    (:meth:`settle` after a successful take or ``wait()``); after a failed one
    the pool is dropped, since a PUT of that save may still be reading.
    With ``keep=False`` nothing is kept: every take allocates.
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}
        self._used: list[bytearray] = []

    def take(self, nbytes: int) -> bytearray:
        # A bytearray: the tjs3 plugin hands a whole one to botocore as the
        # PUT body as it is (a memoryview it would have to copy into bytes
        # first). New ones are zero-filled; kept ones are not.
        kept = self._free.get(nbytes)
        buf = kept.pop() if kept else bytearray(nbytes)
        self._used.append(buf)
        return buf

    def settle(self, ok: bool) -> None:
        """The take that used the handed-out buffers is over: keep them if it
        succeeded, drop everything if not."""
        self._free = {}
        if ok and self.keep:
            for buf in self._used:
                self._free.setdefault(len(buf), []).append(buf)
        self._used = []

    def clear(self) -> None:
        self._free, self._used = {}, []


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes as a flat uint8 view (no copy): what
    torchsnapshot's ``tensor_as_memoryview`` serialises."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _plain_cpu_tensor(tensor: Any) -> bool:
    from torchsnapshot.uvm_tensor import is_uvm_tensor

    return (isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous()
            and not is_uvm_tensor(tensor))


_DCP_STAGER: Any = None


def _dcp_stager() -> type:
    """The staging of DCP async saves: a copy of the state in CPU memory,
    taken before ``async_save`` returns (built once; imports DCP).

    torch 2.13's ``DefaultStager`` deep-copies tensor by tensor and fails on
    FSDP's sharded state dict ("torch function 'data_ptr' ... not supported
    for ShardedTensor"); torch's own state-dict utilities, used here, copy
    plain tensors, ``ShardedTensor`` local shards and ``DTensor`` local
    tensors alike. With ``keep`` the buffers are kept and reused while the
    state's layout (keys, tensor types, shapes, dtypes, shards) is unchanged;
    a changed layout (optimizer state appearing after the first step, say)
    gets new buffers rather than a silently broadcasting or casting copy.
    Pinned buffers only where there is a GPU to copy from.
    """
    global _DCP_STAGER
    if _DCP_STAGER is not None:
        return _DCP_STAGER
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import AsyncStager

    class Stager(AsyncStager):
        _synchronize_after_execute = False  # the copy is done when stage() returns

        def __init__(self, *, keep: bool) -> None:
            self.keep = keep
            self._buffers: Any = None
            self._layout: Any = None

        def stage(self, state_dict: Any) -> Any:
            layout = _state_layout(state_dict)
            buffers = self._buffers if self.keep and layout == self._layout else None
            if buffers is None:
                buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            if self.keep:
                self._buffers, self._layout = buffers, layout
            return _copy_state_dict(state_dict, buffers, type_check=False)

        def synchronize_staging(self) -> None:
            pass

        def close(self) -> None:
            self._buffers = self._layout = None

    _DCP_STAGER = Stager
    return Stager


def _state_layout(obj: Any) -> Any:
    """What must match for a state's staging buffers to be reused (values of
    non-tensor leaves do not: they are taken fresh every time)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(obj, ShardedTensor):
        return ("sharded", tuple(obj.size()), obj.dtype,
                tuple((tuple(s.metadata.shard_offsets), tuple(s.tensor.shape), s.tensor.dtype)
                      for s in obj.local_shards()))
    if isinstance(obj, DTensor):
        return ("dtensor", tuple(obj.shape), tuple(obj.to_local().shape), obj.dtype, obj.placements,
                obj.device_mesh)
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return ("dict", tuple((k, _state_layout(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_state_layout(v) for v in obj))
    return "value"  # taken fresh every time, whatever its type
