"""DCP's ``FsspecReader`` with parallel ranged GETs, for restores from S3.

The stock reader (``FileSystemReader.read_data``, torch 2.13) opens one
object at a time and reads each tensor through an s3fs buffered stream:
one request in flight, so a restore ran at a fraction of what the S3
server serves to parallel GETs (docs/benchmarks.md, "Restore"). This reader
reads the same objects and metadata, with the same checks, but fetches the
byte ranges a rank needs as ranged GETs on s3fs's loop, a bounded number of
bytes in flight, each body streamed into the target tensors as it arrives
(:mod:`.stream_read`), and commits each object's tensors in plan order on the
calling thread once its bytes are there."""

from __future__ import annotations

import asyncio
import collections
import io
import os
from typing import Any

from trainingjob_trainer import s3
from trainingjob_trainer.backends import stream_read

#: Bytes of ranged GETs in flight per rank (one range is always allowed, even
#: a larger one): 8 of DCP's 16 MiB objects at once.
DCP_READ_BYTES_IN_FLIGHT = 128 << 20
#: A range is fetched as GETs of about this size, in parallel (:func:`_chunks`).
DCP_READ_CHUNK_BYTES = 16 << 20

_DCP_S3_READER: type | None = None


def _chunks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into ``round(span / size)`` equal ranges, at least one
    (one empty range for an empty span).

    Equal parts of about ``size`` bytes (at most 1.5x), never a small tail: a
    DCP object is its items plus a few KiB of ``torch.save`` framing, so cutting
    at ``size`` sent a 16 MiB object as a 16 MiB GET and a KiB one, whose bytes
    were then joined (one more copy of the object).
    """
    span = end - start
    if span <= 0:
        return [(start, start)]
    n = max(1, round(span / size))
    part = -(-span // n)
    return [(a, min(a + part, end)) for a in range(start, end, part)]


def _dcp_s3_reader() -> type:
    """The reader class (built once; imports DCP)."""
    global _DCP_S3_READER
    if _DCP_S3_READER is not None:
        return _DCP_S3_READER
    import torch
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.planner import LoadItemType

    class S3Reader(FsspecReader):
        def __init__(self, path: str, *, bytes_in_flight: int | None = None, chunk_bytes: int | None = None,
                     **fs_kwargs: Any) -> None:
            super().__init__(path, **fs_kwargs)
            self.bytes_in_flight = int(DCP_READ_BYTES_IN_FLIGHT if bytes_in_flight is None else bytes_in_flight)
            self.chunk_bytes = max(1, int(DCP_READ_CHUNK_BYTES if chunk_bytes is None else chunk_bytes))

        def read_data(self, plan: Any, planner: Any) -> Any:
            from torch.futures import Future

            per_file: dict[str, list[Any]] = {}
            for req in plan.items:
                per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
            files = []
            for rel, reqs in per_file.items():
                infos = [self.storage_data[r.storage_index] for r in reqs]
                start = min(i.offset for i in infos)
                end = max(i.offset + i.length for i in infos)
                files.append((os.fspath(self.fs.concat_path(self.path, rel)), reqs, start, end))
            checked: dict = {}  # the item layouts verified so far (stream_read.Item.verify)
            for (path, reqs, _, _), items in self._fetched(files, planner):
                self._load(path, reqs, items, planner, checked)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        def _items(self, reqs: list[Any], planner: Any) -> dict[tuple[int, int], stream_read.Item]:
            """Each stored item of one object by ``(offset, length)``, with the target its
            data record is streamed into, when it can be (see :mod:`.stream_read`)."""
            readers: dict[tuple[int, int], list[Any]] = {}
            for req in reqs:
                info = self.storage_data[req.storage_index]
                readers.setdefault((info.offset, info.length), []).append(req)
            items = {}
            for (offset, length), on in readers.items():
                target = self._stream_target(on[0], planner) if len(on) == 1 else None
                items[offset, length] = stream_read.Item(offset, length, target)
            return items

        def _stream_target(self, req: Any, planner: Any) -> Any:
            """The tensor ``req``'s item can be streamed into, or ``None``: a tensor item
            without transforms, read whole (not resharded), into a contiguous CPU tensor."""
            info = self.storage_data[req.storage_index]
            if req.type == LoadItemType.BYTE_IO or info.transform_descriptors or any(req.storage_offsets):
                return None
            metadata = getattr(planner, "metadata", None)
            md = metadata.state_dict_metadata.get(req.storage_index.fqn) if metadata is not None else None
            chunks = getattr(md, "chunks", None)
            index = req.storage_index.index
            if not chunks or index is None or index >= len(chunks) or list(chunks[index].sizes) != list(req.lengths):
                return None
            target = planner.resolve_tensor(req).detach()
            return target if stream_read.byte_view(target) is not None else None

        def _fetched(self, files: list[tuple[str, list[Any], int, int]], planner: Any):
            """Each file with its items, in order, once all its bytes arrived; GETs run on
            s3fs's loop, about ``bytes_in_flight`` bytes requested at a time."""
            fs = self.fs.fs
            queue = collections.deque(files)
            pending: collections.deque = collections.deque()
            in_flight = 0
            try:
                while queue or pending:
                    while queue and (not pending or in_flight + queue[0][3] - queue[0][2] <= self.bytes_in_flight):
                        path, reqs, start, end = f = queue.popleft()
                        items = self._items(reqs, planner)
                        ordered = sorted(items.values(), key=lambda it: it.offset)
                        gets = [asyncio.run_coroutine_threadsafe(stream_read.get_into(fs, path, a, b, ordered),
                                                                 fs.loop)
                                for a, b in _chunks(start, end, self.chunk_bytes)]
                        pending.append((f, items, gets))
                        in_flight += end - start
                    f, items, gets = pending.popleft()
                    for g in gets:
                        g.result()  # wait (re-raises the GET's error)
                    in_flight -= f[3] - f[2]
                    yield f, items
            finally:
                for _, _, gets in pending:
                    for g in gets:
                        g.cancel()

        def _load(self, path: str, reqs: list[Any], items: dict[tuple[int, int], Any], planner: Any,
                  checked: dict) -> None:
            """Commit each request of one object, its item's bytes all arrived.

            A streamed item already is its target (once :meth:`Item.verify` says
            so): nothing is copied. Any other item is loaded in place from its
            buffer (:func:`_tensor_in_place`) and copied once into the target;
            a streamed item whose check failed is fetched again for that. Items
            with stream transforms take the stock path.
            """
            loaded: dict[tuple[int, int], Any] = {}
            for req in reqs:
                info = self.storage_data[req.storage_index]
                item = items[info.offset, info.length]
                if item.routed:
                    tensor = item.verify(checked)
                    if tensor is not None:
                        planner.commit_tensor(req, item.target)
                        continue
                    item.whole = bytearray(self.fs.fs.cat_file(path, start=info.offset,
                                                               end=info.offset + info.length))
                data = item.whole
                if req.type != LoadItemType.BYTE_IO and not info.transform_descriptors:
                    key = (info.offset, info.length)
                    if key not in loaded:
                        loaded[key] = _tensor_in_place(data, 0, memoryview(data))
                    tensor = loaded[key]
                else:
                    stream = self.transforms.transform_load_stream(req, info.transform_descriptors or (),
                                                                   io.BytesIO(data))
                    if req.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(req, io.BytesIO(stream.read(-1)))
                        continue
                    seekable = stream if stream.seekable() else io.BytesIO(stream.read(-1))
                    tensor = torch.load(seekable, map_location="cpu", weights_only=True)
                tensor = dcp_fs.narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
                target.copy_(tensor)
                planner.commit_tensor(req, target)

    _DCP_S3_READER = S3Reader
    return S3Reader


def _tensor_in_place(data: Any, offset: int, item: memoryview) -> Any:
    """The tensor ``torch.save`` wrote as ``item`` (at ``offset`` in ``data``),
    its storage a view of ``data``'s bytes: what ``torch.load(..., mmap=True)``
    does for a file, done for a buffer. Same unpickler as the stock reader
    (``weights_only``); the view is read-only and lives until the copy into
    the target."""
    import warnings

    import torch
    from torch import serialization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": it is only read
        storage = torch.frombuffer(data, dtype=torch.uint8, offset=offset, count=len(item)).untyped_storage() \
            if len(item) else torch.UntypedStorage(0)
    with serialization._open_zipfile_reader(s3.ViewReader(item)) as zipped:
        return serialization._load(zipped, "cpu", serialization._weights_only_unpickler, overall_storage=storage)
