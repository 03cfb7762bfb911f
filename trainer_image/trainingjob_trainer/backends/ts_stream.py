"""torchsnapshot restore: GET bodies streamed straight into the target tensors.

torchsnapshot 0.1.0 reads a restore's objects through the storage plugin into
a ``BytesIO``, takes its bytes, slices a batched slab's bytes into one new
``bytes`` per tensor, and copies each slice into the target tensor: three
copies of every byte after the socket, and an object-sized allocation per
GET (its own comment in ``TensorIOPreparer.prepare_read`` says it should load
into the target's memory instead). For a read request whose every consumer is
a buffer-protocol tensor read whole into a contiguous CPU tensor of its dtype
and shape, :func:`read_buffer` streams the GET body through
:func:`.stream_read.get_into` straight into the targets' memory, and marks the
request consumed. Any other request (``torch.save`` tensors, objects, tiled
or chunked reads, a target of another layout) takes torchsnapshot's own path.
The bytes are the tensors' bytes (the buffer-protocol serializer), so there is
no framing to check; the GET's ``Content-Range`` must name the object's size
when a request reads a whole object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainingjob_trainer.backends import stream_read

_STOCK: dict[str, Any] = {}


class _Consumed:
    """The buffer consumer of a request streamed into its targets: nothing is left to do."""

    async def consume_buffer(self, buf: bytes, executor: Any = None) -> None:
        return None

    def get_consuming_cost_bytes(self) -> int:
        return 0


def _items(req: Any, start: int) -> list[stream_read.Item] | None:
    """The request's tensors as items streamed into their targets, or ``None`` if any one cannot be."""
    from torchsnapshot.batcher import BatchedBufferConsumer
    from torchsnapshot.io_preparers.tensor import TensorBufferConsumer
    from torchsnapshot.serialization import Serializer, string_to_dtype

    consumer = req.buffer_consumer
    if isinstance(consumer, BatchedBufferConsumer):
        parts = [(start + a, b - a, c) for (a, b), c in consumer.byte_range_to_buffer_consumer.items()]
    else:
        end = req.byte_range[1] if req.byte_range is not None else None
        parts = [(start, None if end is None else end - start, consumer)]
    items = []
    for offset, length, c in parts:
        if type(c) is not TensorBufferConsumer or c.entry.serializer != Serializer.BUFFER_PROTOCOL.value:
            return None
        t = c.tensor
        if t.is_quantized or string_to_dtype(c.entry.dtype) != t.dtype or list(c.entry.shape) != list(t.shape):
            return None
        item = stream_read.Item(offset, t.nbytes if length is None else length, t, raw=True)
        if not item.routed:
            return None
        items.append(item)
    return sorted(items, key=lambda it: it.offset)


async def read_buffer(pipeline: Any) -> Any:
    """``_ReadPipeline.read_buffer``: streamed for this project's plugin when it can be."""
    from trainingjob_trainer.ts_plugin import S3FSStoragePlugin

    req = pipeline.read_req
    start = req.byte_range[0] if req.byte_range is not None else 0
    items = _items(req, start) if isinstance(pipeline.storage, S3FSStoragePlugin) else None
    if not items:
        return await _STOCK["read_buffer"](pipeline)
    end = items[-1].offset + items[-1].length
    await pipeline.storage.read_into(req.path, start, end, items,
                                     object_size=end if req.byte_range is None else None)
    pipeline.buf, pipeline.buf_sz_bytes = b"", end - start
    pipeline.read_req = dataclasses.replace(req, buffer_consumer=_Consumed())
    return pipeline


def install() -> None:
    """Route torchsnapshot's reads through :func:`read_buffer`, once per process."""
    if _STOCK:
        return
    from torchsnapshot import scheduler

    _STOCK["read_buffer"] = scheduler._ReadPipeline.read_buffer
    scheduler._ReadPipeline.read_buffer = read_buffer
