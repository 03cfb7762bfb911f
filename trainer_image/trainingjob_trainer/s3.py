"""S3 access for every layer of the trainer: one s3fs filesystem per process.

The endpoint and region come from the contract's environment
(:data:`contract.ENV_S3_ENDPOINT`, :data:`contract.ENV_S3_REGION`), the
credentials from the standard ``AWS_*`` variables; explicit
``storage_options`` win over both. Listing, saving (both backends), loading
and pruning all go through :func:`filesystem`, so an S3-compatible endpoint
reaches all of them.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

from trainingjob_trainer import contract

#: URL scheme of this project's torchsnapshot storage plugin (see ts_plugin).
TORCHSNAPSHOT_SCHEME = "tjs3"
#: botocore's ``read_timeout`` for every S3 client of the trainer (seconds).
#: aiobotocore's clock runs while a request body is still being uploaded, so
#: with the default 60 s an object that needs longer than that to upload (a
#: slow or throttled link) is cut and retried from zero, forever: 1 MB at
#: 14 KB/s through the test proxy never completed. ``storage_options``
#: ``config_kwargs`` win.
READ_TIMEOUT_SECONDS = 300
#: ``storage_options`` key (never passed to s3fs) through which the snapshotter
#: hands torchsnapshot's ``tjs3`` plugin a ``record(path, size, etag)``
#: callback for every object it writes (see ``store.SnapshotStore.commit``).
RECORD_WRITES_OPTION = "tj_record_writes"


def storage_options_from_env(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """s3fs keyword arguments from the contract env, overridden by ``overrides``.

    Args:
        overrides: Caller-supplied s3fs options (``endpoint_url``, ``key``...).
        environ: The environment to read (``os.environ`` by default).

    Returns:
        A new dict suitable for ``s3fs.S3FileSystem(**options)``.
    """
    env = os.environ if environ is None else environ
    opts: dict[str, Any] = {}
    if env.get(contract.ENV_S3_ENDPOINT):
        opts["endpoint_url"] = env[contract.ENV_S3_ENDPOINT]
    if env.get(contract.SECRET_KEY_ACCESS_KEY_ID) and env.get(contract.SECRET_KEY_SECRET_ACCESS_KEY):
        opts["key"] = env[contract.SECRET_KEY_ACCESS_KEY_ID]
        opts["secret"] = env[contract.SECRET_KEY_SECRET_ACCESS_KEY]
        if env.get(contract.SECRET_KEY_SESSION_TOKEN):
            opts["token"] = env[contract.SECRET_KEY_SESSION_TOKEN]
    if env.get(contract.ENV_S3_REGION):
        opts.setdefault("client_kwargs", {})["region_name"] = env[contract.ENV_S3_REGION]
    opts["config_kwargs"] = {"read_timeout": READ_TIMEOUT_SECONDS}
    for k, v in (overrides or {}).items():
        if k in ("client_kwargs", "config_kwargs"):
            opts.setdefault(k, {}).update(v)
        else:
            opts[k] = v
    # Listings must always be fresh: the completion rule compares ETags.
    opts.setdefault("use_listings_cache", False)
    return opts


def split_uri(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("file", path)`` otherwise."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme, rest.rstrip("/")
    return "file", os.path.abspath(uri).rstrip("/")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` points at S3 (``s3://`` or ``s3a://``)."""
    return split_uri(uri)[0] in ("s3", "s3a")


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec filesystem for ``uri`` and the path inside it.

    For S3 the instance is cached by fsspec per option set, so every caller in
    the process shares one client (one connection pool).

    Returns:
        ``(fs, path)`` where ``path`` has no protocol.
    """
    scheme, path = split_uri(uri)
    if scheme in ("s3", "s3a"):
        import s3fs

        return s3fs.S3FileSystem(**storage_options_from_env(storage_options)), path
    import fsspec

    return fsspec.filesystem("file", auto_mkdir=True), path


def cat_small(fs: Any, path: str) -> bytes:
    """The whole of a small object (a marker, the fence, a progress or request object) in one GET.

    s3fs's ``cat_file`` first sends a HEAD for the object's size (to split a
    large one into concurrent ranged GETs) unless ``max_concurrency`` is 1:
    for the contract's small objects that HEAD doubled every read.

    Raises:
        FileNotFoundError: The object does not exist.
    """
    return fs.cat_file(path, max_concurrency=1)


def join(uri: str, *parts: str) -> str:
    """Join URI parts with single slashes."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def to_torchsnapshot_url(uri: str) -> str:
    """The URL torchsnapshot must be given for ``uri`` (s3 -> our plugin)."""
    scheme, path = split_uri(uri)
    if scheme in ("s3", "s3a"):
        return f"{TORCHSNAPSHOT_SCHEME}://{path}"
    return path


class ViewReader(io.RawIOBase):
    """Bytes as a seekable file over a buffer, never copied whole.

    The torchsnapshot plugin's multipart parts (botocore and aiohttp read
    them in small chunks, and rewind them to retry) and DCP's restore (torch's
    zip reader reads an item's small records from it; see ``dcp_read``).
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos, self._size = view, 0, len(view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def __len__(self) -> int:
        return self._size - self._pos
