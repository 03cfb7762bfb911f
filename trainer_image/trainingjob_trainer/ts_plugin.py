"""torchsnapshot storage plugin on s3fs, registered as the ``tjs3`` scheme.

torchsnapshot's built-in ``s3`` plugin ignores ``storage_options`` (the
endpoint only comes from ``AWS_ENDPOINT_URL``) and opens one client per
object. This plugin takes the same options as every other layer of the
trainer (:func:`trainingjob_trainer.s3.storage_options_from_env`) and shares
one s3fs client per process. torchsnapshot finds it through the
``storage_plugins`` entry point in ``pyproject.toml``; the built-in ``s3``
scheme cannot be overridden, so callers pass ``tjs3://bucket/key``
(:func:`trainingjob_trainer.s3.to_torchsnapshot_url`).
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any, Dict, Optional

from torchsnapshot.io_types import ReadIO, StoragePlugin, WriteIO

from trainingjob_trainer import contract, s3

#: Objects at least twice this size are uploaded as a multipart upload with
#: parts of this size, several in flight at once (torchsnapshot writes ~128
#: MiB slabs; as one PUT, or s3fs's 50 MiB parts, they went out 1-3 requests
#: wide).
PART_BYTES = 16 << 20
#: Default bound on the bytes of multipart parts in flight per rank (all
#: uploads of the process together); ``$TJ_S3_MAX_INFLIGHT_BYTES`` overrides.
#: A part waits for room before it starts (one part always may). Parts are
#: sent from the staged buffer itself (:class:`s3.ViewReader`), never copied,
#: so the bound is on concurrency and on what botocore and the sockets
#: hold, not on new memory. Before issue 8 every part of every upload
#: started at once, each as a copy: a 2 GiB state cost a second 2 GiB.
MAX_INFLIGHT_BYTES = 256 << 20


def max_inflight_bytes() -> int:
    """The per-rank bound on multipart bytes in flight (env over the default)."""
    raw = os.environ.get(contract.ENV_S3_MAX_INFLIGHT_BYTES, "").strip()
    return max(PART_BYTES, int(raw)) if raw else MAX_INFLIGHT_BYTES


class _Budget:
    """Bytes in flight on one event loop, at most ``limit`` (a part larger than the rest runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)

    async def release(self, n: int) -> None:
        assert self._cond is not None
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


_BUDGETS: dict[int, _Budget] = {}


def _budget(loop: asyncio.AbstractEventLoop) -> _Budget:
    """The process's budget on ``loop`` (s3fs runs every upload of a process on one loop)."""
    b = _BUDGETS.get(id(loop))
    if b is None:
        b = _BUDGETS[id(loop)] = _Budget(max_inflight_bytes())
    return b


class S3FSStoragePlugin(StoragePlugin):
    """Reads and writes torchsnapshot objects under ``bucket/prefix`` with s3fs.

    Args:
        root: ``bucket/prefix`` (no scheme).
        storage_options: s3fs options; merged over the contract env.
    """

    def __init__(self, root: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        opts = dict(storage_options or {})
        self._record = opts.pop(s3.RECORD_WRITES_OPTION, None)
        self.fs, self.root = s3.filesystem(f"s3://{root}", opts)
        self.written: list[str] = []

    def _key(self, path: str) -> str:
        return f"{self.root}/{path.lstrip('/')}"

    async def write(self, write_io: WriteIO) -> None:
        # Runs on s3fs's own I/O loop (no executor thread parked per write).
        key = self._key(write_io.path)
        fut = asyncio.run_coroutine_threadsafe(self._put(key, write_io.buf), self.fs.loop)
        await asyncio.wrap_future(fut)
        self.written.append(write_io.path)

    async def _put(self, key: str, buf: Any) -> None:
        """PUT ``buf`` (bytes or a memoryview) at ``key``; each byte is copied
        at most once (botocore takes ``bytes`` but not a ``memoryview``)."""
        view = memoryview(buf).cast("B")
        bucket, path, _ = self.fs.split_path(key)
        size = view.nbytes
        if size < 2 * PART_BYTES:
            if isinstance(buf, (bytes, bytearray)):
                body = buf
            elif isinstance(buf, memoryview) and isinstance(buf.obj, bytearray) and buf.nbytes == len(buf.obj):
                body = buf.obj  # a whole staging buffer (backends._SlabPool.take): no copy
            else:
                body = view.tobytes()
            out = await self.fs._call_s3("put_object", Bucket=bucket, Key=path, Body=body)
            self._recorded(key, size, out)
            return
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=path)
        upload_id = mpu["UploadId"]

        budget = _budget(asyncio.get_running_loop())

        async def part(number: int, start: int) -> dict[str, Any]:
            body = view[start:start + PART_BYTES]
            await budget.acquire(body.nbytes)
            try:
                out = await self.fs._call_s3("upload_part", Bucket=bucket, Key=path, UploadId=upload_id,
                                             PartNumber=number, Body=s3.ViewReader(body))
            finally:
                await budget.release(body.nbytes)
            return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(range(0, size, PART_BYTES))))
            out = await self.fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id,
                                         MultipartUpload={"Parts": list(parts)})
            self._recorded(key, size, out)
        except BaseException:
            try:
                await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original error matters
                pass
            raise

    def _recorded(self, key: str, size: int, answer: Any) -> None:
        if self._record is not None:
            self._record(key, size, (answer or {}).get("ETag", ""))

    async def read(self, read_io: ReadIO) -> None:
        # On s3fs's own I/O loop, as writes are. Through ``run_in_executor``
        # each GET held one of the default executor's threads (6 on 2 CPUs),
        # so a restore had at most 6 GETs in flight, not torchsnapshot's 16.
        key = self._key(read_io.path)
        start, end = read_io.byte_range if read_io.byte_range is not None else (None, None)
        fut = asyncio.run_coroutine_threadsafe(self.fs._cat_file(key, start=start, end=end), self.fs.loop)
        read_io.buf = io.BytesIO(await asyncio.wrap_future(fut))

    async def read_into(self, path: str, start: int, end: int, items: list[Any], *,
                        object_size: int | None = None) -> None:
        """Bytes ``[start, end)`` of ``path`` streamed into ``items``' memory, on s3fs's loop
        (:func:`~trainingjob_trainer.backends.stream_read.get_into`; :mod:`~trainingjob_trainer.backends.ts_stream`)."""
        from trainingjob_trainer.backends import stream_read

        coro = stream_read.get_into(self.fs, self._key(path), start, end, items, object_size=object_size)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))

    async def delete(self, path: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.fs.rm_file, self._key(path))

    async def delete_dir(self, path: str) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.fs.rm(self._key(path), recursive=True)
        )

    async def close(self) -> None:
        """Nothing to close: the s3fs client is shared by the process."""


def make_plugin(root: str, storage_options: Optional[Dict[str, Any]] = None) -> StoragePlugin:
    """Entry-point factory torchsnapshot calls for ``tjs3://<root>``."""
    return S3FSStoragePlugin(root, storage_options)
