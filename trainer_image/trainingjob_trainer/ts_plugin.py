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
from typing import Any, Dict, Optional

from torchsnapshot.io_types import ReadIO, StoragePlugin, WriteIO

from trainingjob_trainer import s3


class S3FSStoragePlugin(StoragePlugin):
    """Reads and writes torchsnapshot objects under ``bucket/prefix`` with s3fs.

    Args:
        root: ``bucket/prefix`` (no scheme).
        storage_options: s3fs options; merged over the contract env.
    """

    def __init__(self, root: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.fs, self.root = s3.filesystem(f"s3://{root}", storage_options)
        self.written: list[str] = []

    def _key(self, path: str) -> str:
        return f"{self.root}/{path.lstrip('/')}"

    async def write(self, write_io: WriteIO) -> None:
        data = write_io.buf if isinstance(write_io.buf, bytes) else bytes(write_io.buf)
        key = self._key(write_io.path)
        await asyncio.get_running_loop().run_in_executor(None, self.fs.pipe_file, key, data)
        self.written.append(write_io.path)

    async def read(self, read_io: ReadIO) -> None:
        import io

        key = self._key(read_io.path)
        start, end = read_io.byte_range if read_io.byte_range is not None else (None, None)
        data = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.fs.cat_file(key, start=start, end=end)
        )
        read_io.buf = io.BytesIO(data)

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
