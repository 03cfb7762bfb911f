"""Restores: each GET body streamed straight into the target tensors' memory.

Both backends use it: DCP's reader (:mod:`.dcp_read`) for ``torch.save``
items, torchsnapshot's pipeline (:mod:`.ts_stream`) for raw buffers
(``Item(raw=True)``: every byte goes to the target).

A DCP item of a tensor is a ``torch.save`` zip: a few hundred bytes of
records (the pickle, the byte order...), the tensor's bytes as the record
``<prefix>/data/0``, then a trailer (the central directory). :class:`Item`
routes every byte of a ranged GET as it arrives: the item's first
:data:`HEAD_BYTES` to a small buffer, in which the data record's local header
is found; the record's bytes into the target tensor's own memory; the trailer
to another small buffer. So each byte is copied once, from the socket's chunk
into the model, while the GET runs, and no object-sized buffer is allocated.
Before, every GET's body was assembled into new bytes (256 MiB of fresh pages
for a 256 MiB restore) and copied into the targets after it ended: on 2 CPUs
shared with the S3 server, that copy and those pages were most of what a
restore spent beyond its GETs (docs/benchmarks.md, "Restore").

The routing is a guess until checked: :meth:`Item.verify` opens the item with
torch's own zip reader (over the head, the target and the trailer) and loads
it with the ``weights_only`` unpickler, whose storage is the target's memory
only if the central directory puts the data record exactly where the bytes
were routed. Any other outcome (another layout, dtype, shape or stride) makes
the caller fetch the item again the stock way and copy it, so a wrong guess
costs a second GET, never a wrong tensor. Items that cannot be routed (bytes
items, stream transforms, resharded or non-contiguous targets, an item read
by two requests) arrive in a buffer of their own (:attr:`Item.whole`).
"""

from __future__ import annotations

import asyncio
import bisect
import io
import struct
from http.client import IncompleteRead
from typing import Any

from trainingjob_trainer import s3

#: The first bytes of every routed item go to a buffer of this size; the data
#: record's local header must lie inside it (about 600 bytes in for a tensor).
HEAD_BYTES = 64 << 10
_LOCAL_HEADER = b"PK\x03\x04"
#: Bytes of a GET that no request reads (between two items of an object) land here.
_DISCARD = memoryview(bytearray(1 << 20))


class NotRouted(Exception):
    """The item's data record is not where its bytes were routed."""


def _data_start(head: bytes | bytearray) -> int | None:
    """Offset of the first byte of the record ``*/data/0`` in a ``torch.save`` zip's
    first bytes, or ``None`` if its local header is not wholly inside them."""
    i = head.find(_LOCAL_HEADER)
    while 0 <= i and i + 30 <= len(head):
        name_len, extra_len = struct.unpack_from("<HH", head, i + 26)
        start = i + 30 + name_len + extra_len
        if bytes(head[i + 30:i + 30 + name_len]).endswith(b"/data/0"):
            return start if start <= len(head) else None
        i = head.find(_LOCAL_HEADER, i + 4)
    return None


def byte_view(tensor: Any) -> memoryview | None:
    """A writable byte view of a contiguous CPU tensor's memory, or ``None`` when there is none."""
    import torch

    try:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            return None
        return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")
    except (RuntimeError, TypeError, ValueError):  # a dtype numpy or view() does not take
        return None


class Item:
    """Where the bytes of one stored item go, ``[offset, offset + length)`` of its object.

    Args:
        offset: The item's first byte in its object.
        length: Its size.
        target: The tensor its data record is streamed into (contiguous, on
            the CPU, of exactly the record's size), or ``None``: then the
            whole item arrives in :attr:`whole`.
        raw: The item is the tensor's bytes and nothing else (torchsnapshot's
            buffer-protocol serializer, :mod:`.ts_stream`): every byte goes to
            the target, which must be ``length`` bytes.
    """

    def __init__(self, offset: int, length: int, target: Any = None, *, raw: bool = False) -> None:
        self.offset, self.length, self.target = offset, length, target
        self.data = byte_view(target) if target is not None else None
        if raw and self.data is not None and len(self.data) != length:
            self.data = None
        self.whole: bytearray | None = None
        self.head = bytearray(min(length, HEAD_BYTES)) if self.data is not None and not raw else None
        self.head_got = 0
        self.ds = 0  # the data record's first byte in the item, once the head is parsed
        self.tail_start, self.tail = length, bytearray(0)
        self.parsed = asyncio.Event()
        if self.data is None:
            self.whole = bytearray(length)
        if self.head is None:
            self.parsed.set()

    @property
    def routed(self) -> bool:
        """Whether the data record is being streamed into the target."""
        return self.whole is None

    def dest(self, rel: int) -> memoryview | None:
        """Writable memory for the item's bytes from ``rel`` on, up to the end of
        that region; ``None`` while the head (which decides it) is incomplete."""
        if self.whole is not None:
            return memoryview(self.whole)[rel:]
        if self.head is not None and rel < len(self.head):
            return memoryview(self.head)[rel:]
        if not self.parsed.is_set():
            return None
        if self.whole is not None:
            return memoryview(self.whole)[rel:]
        if rel < self.ds + len(self.data):
            return self.data[rel - self.ds:]
        return memoryview(self.tail)[rel - self.tail_start:]

    def wrote(self, rel: int, n: int) -> None:
        """``n`` bytes were written at ``rel`` (on the I/O loop): the head is parsed once complete."""
        if self.head is not None and not self.parsed.is_set() and rel < len(self.head):
            self.head_got += min(n, len(self.head) - rel)
            if self.head_got == len(self.head):
                self._parse()

    def _parse(self) -> None:
        ds = _data_start(self.head)
        if ds is None or ds + len(self.data) > self.length:
            self.whole = bytearray(self.length)  # not a layout to route: the rest comes in whole
            self.whole[:len(self.head)] = self.head
        else:
            self.ds = ds
            self.tail_start = max(len(self.head), ds + len(self.data))
            self.tail = bytearray(self.length - self.tail_start)
        self.parsed.set()

    def verify(self, checked: dict[Any, bool] | None = None) -> Any | None:
        """After every byte arrived: the tensor torch loads from the item, over the
        target's memory, or ``None`` if the routing was wrong (see the module).

        ``checked`` (one dict per restore) keeps the layouts already loaded and
        found right: an item whose bytes before its data record (local headers,
        pickle, byte order) equal a checked item's, read into a target of the same
        dtype, shape and strides, only has its data record's offset checked by
        torch's zip reader (0.03 ms), not the unpickler run again (0.2-0.8 ms,
        most of a 1 MiB item's cost on 2 CPUs)."""
        from torch import serialization

        if not self.routed:
            return None
        in_head = max(0, min(len(self.head), self.ds + len(self.data)) - self.ds)
        self.data[:in_head] = self.head[self.ds:self.ds + in_head]
        t = self.target
        key = (bytes(self.head[:self.ds]), t.dtype, tuple(t.shape), t.stride())
        try:
            with serialization._open_zipfile_reader(_ItemReader(self)) as zipped:
                if checked is not None and key in checked:
                    return t if zipped.get_record_offset("data/0") == self.ds else None
                tensor = serialization._load(zipped, "cpu", serialization._weights_only_unpickler,
                                             overall_storage=_RoutedStorage(self))
        except NotRouted:
            return None
        same = (getattr(tensor, "dtype", None) == t.dtype and tensor.shape == t.shape
                and tensor.stride() == t.stride() and tensor.data_ptr() == t.data_ptr())
        if same and checked is not None:
            checked[key] = True
        return tensor if same else None


class _ItemReader(s3.ViewReader):
    """A routed item's bytes as a seekable file: head, then target memory, then trailer."""

    def __init__(self, item: Item) -> None:
        super().__init__(memoryview(b""))
        self._item, self._size = item, item.length

    def readinto(self, b: Any) -> int:
        it, done, out = self._item, 0, memoryview(b).cast("B")
        while done < len(out) and self._pos < it.length:
            p = self._pos
            if p < len(it.head):
                src = memoryview(it.head)[p:]
            elif p < it.tail_start:
                src = it.data[p - it.ds:it.tail_start - it.ds]
            else:
                src = memoryview(it.tail)[p - it.tail_start:]
            n = min(len(src), len(out) - done)
            out[done:done + n] = src[:n]
            done += n
            self._pos += n
        return done


class _RoutedStorage:
    """``overall_storage`` for torch's ``_load``: the data record's slice is the target's storage."""

    def __init__(self, item: Item) -> None:
        self._item = item

    def __getitem__(self, s: slice) -> Any:
        it = self._item
        if s.start != it.ds or s.stop - s.start != len(it.data):
            raise NotRouted(f"data record at [{s.start}, {s.stop}), routed to [{it.ds}, {it.ds + len(it.data)})")
        t = it.target
        first = t.storage_offset() * t.element_size()
        return t.untyped_storage()[first:first + len(it.data)]


async def get_into(fs: Any, path: str, start: int, end: int, items: list[Item], *,
                   object_size: int | None = None) -> None:
    """GET ``[start, end)`` of ``path`` on s3fs's loop, each byte into its item's memory
    (:meth:`Item.dest`); ``items`` are sorted by offset. A body cut short, or a
    retryable error, resumes from the first missing byte, with s3fs's retries.
    With ``object_size``, the answer's ``Content-Range`` must say the object has
    that size (``ValueError`` if not: the read was meant to be the whole object)."""
    from s3fs.core import _error_wrapper

    bucket, key, _ = fs.split_path(path)
    offsets = [it.offset for it in items]
    pos = start

    async def dest() -> tuple[memoryview, Item | None]:
        i = bisect.bisect_right(offsets, pos) - 1
        if i >= 0 and pos < items[i].offset + items[i].length:
            it = items[i]
            view = it.dest(pos - it.offset)
            while view is None:
                await it.parsed.wait()
                view = it.dest(pos - it.offset)
            return view[:end - pos], it
        nxt = items[i + 1].offset if i + 1 < len(items) else end
        return _DISCARD[:min(nxt, end) - pos], None

    async def rest() -> None:
        nonlocal pos
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={pos}-{end - 1}")
        body = resp["Body"]
        total = (resp.get("ContentRange") or "").rpartition("/")[2]
        if object_size is not None and total != str(object_size):
            body.close()
            raise ValueError(f"{path} is {total or 'of unknown size'} bytes, not the {object_size} expected")
        try:
            while pos < end:
                view, item = await dest()
                n = await body.readinto(view)
                if n == 0:
                    raise IncompleteRead(b"", end - pos)  # retryable for s3fs: the rest is asked for again
                if item is not None:
                    item.wrote(pos - item.offset, n)
                pos += n
        finally:
            body.close()

    if end > start:
        await _error_wrapper(rest, retries=fs.retries)
