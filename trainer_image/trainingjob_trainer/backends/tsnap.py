"""The torchsnapshot backend, through this project's ``tjs3`` S3 plugin."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from typing import Any, Mapping

import torch

from trainingjob_trainer import _dist, s3
from trainingjob_trainer.backends import ts_stream
from trainingjob_trainer.backends.base import BACKEND_TORCHSNAPSHOT, _init_optimizer_states
from trainingjob_trainer.backends.staging import _as_bytes, _plain_cpu_tensor, _SlabPool
from trainingjob_trainer.snapshotter import PendingWrite, Snapshotter

#: torchsnapshot packs tensors smaller than this into slabs, one object each:
#: a slab takes tensors while its size stays below this, so 9 MiB makes slabs
#: of two 4 MiB tensors or eight 1 MiB ones. The default, 128 MiB, made a
#: 256 MiB state of 4 MiB tensors two 124 MiB objects, two uploads wide, 0.3x
#: the raw upload. 4 MiB (until 2026-12-02; measured for saves on moto: 256
#: MiB of 1 MiB tensors saved in 1.02 s with 4 MiB slabs, 1.15 s with 8, 1.19
#: s with 16) left every 4 MiB tensor an object of its own, and a restore of
#: 64 of them paid 64 GETs. On SeaweedFS, one process, 7 rounds each, medians
#: (docs/benchmarks.md): 64 x 4 MiB restored in 0.81 s with 4 MiB slabs and
#: 0.52 s with 9 MiB, saved in 2.21 and 2.34 s; 256 x 1 MiB restored in 0.83
#: and 0.65 s, saved in 2.11 and 2.34 s. A restore is on the path of every
#: recovery; a periodic save is mostly in the background (async stall 0.03x).
#: ``$TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE`` set by the user wins.
TS_SLAB_BYTES = 9 << 20
_TS_SLAB_ENV = "TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE"


#: The buffer pool of the :class:`TorchSnapshotSnapshotter` take in progress
#: (:func:`_ts_tuning`); a context variable, so takes in other threads, or by
#: other code, get torchsnapshot's stock staging.
_TS_POOL: contextvars.ContextVar[_SlabPool | None] = contextvars.ContextVar("tj_ts_pool", default=None)
_TS_STOCK: dict[str, Any] = {}


class _JsonFirstYaml:
    """torchsnapshot's ``manifest.yaml``, reading JSON text with :mod:`json`.

    torchsnapshot 0.1.0 writes a snapshot's manifest with ``json.dumps`` (JSON
    is YAML) and reads it with PyYAML, whose Python-side resolver took 0.26 s
    of a 0.65 s profiled restore of 256 tensors (the C parser does not cover
    it). ``json.loads`` is the exact inverse of what wrote the text; a
    manifest that is not JSON (written as YAML by another version) is read
    by PyYAML as before. Every other attribute is PyYAML's own.
    """

    def __init__(self, stock: Any) -> None:
        self._stock = stock

    def load(self, stream: Any, Loader: Any) -> Any:  # noqa: N803 - PyYAML's own argument name
        if isinstance(stream, (str, bytes)):
            try:
                return json.loads(stream)
            except ValueError:
                pass
        return self._stock.load(stream, Loader=Loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stock, name)


def _ts_install() -> None:
    """Wrap torchsnapshot's two CPU stagers, once per process (the wrappers
    do this package's staging only inside :func:`_ts_tuning`), keep its
    plugin lookup's entry-point scan, stream its reads through the
    ``tjs3`` plugin into the target tensors (:mod:`.ts_stream`), and read
    its JSON manifests with :mod:`json` (:class:`_JsonFirstYaml`)."""
    if _TS_STOCK:
        return
    from torchsnapshot import batcher, storage_plugin
    from torchsnapshot import manifest as ts_manifest
    from torchsnapshot.io_preparers import tensor as ts_tensor

    # torchsnapshot finds the ``tjs3`` plugin by scanning every installed
    # distribution's entry points, at every Snapshot it opens (about 11 ms
    # here, twice per restore). What is installed does not change while a
    # trainer runs, so the scan's answer is kept.
    _TS_STOCK["entry_points"] = stock_entry_points = storage_plugin.entry_points
    storage_plugin.entry_points = functools.lru_cache(maxsize=None)(
        lambda **kw: tuple(stock_entry_points(**kw)))
    ts_stream.install()  # restores: GET bodies into the target tensors
    _TS_STOCK["yaml"] = ts_manifest.yaml
    ts_manifest.yaml = _JsonFirstYaml(ts_manifest.yaml)  # manifests: JSON read as JSON
    _TS_STOCK["slab"] = batcher.BatchedBufferStager.stage_buffer
    _TS_STOCK["tensor"] = ts_tensor.TensorBufferStager.stage_buffer
    batcher.BatchedBufferStager.stage_buffer = _ts_stage_slab
    ts_tensor.TensorBufferStager.stage_buffer = _ts_stage_tensor


@contextlib.contextmanager
def _ts_tuning(pool: _SlabPool):
    """This project's torchsnapshot settings, for the duration of one take.

    * The slab size knob (:data:`TS_SLAB_BYTES`; read from the env while a
      take plans its batches), unless the user set it.
    * Batched tensors staged with one copy each (:func:`_ts_stage_slab`).
    * Unbatched CPU tensors of an async take copied before the take returns
      (:func:`_ts_stage_tensor`): torchsnapshot 0.1.0 means to, but its test
      compares the entry's serializer string with the enum and is never true,
      so it uploaded the live tensor while training changed it.
    * Buffers from ``pool`` (:class:`_SlabPool`); the caller settles it when
      the take's uploads are over.
    """
    _ts_install()
    set_env = _TS_SLAB_ENV not in os.environ
    if set_env:
        os.environ[_TS_SLAB_ENV] = str(TS_SLAB_BYTES)
    token = _TS_POOL.set(pool)
    try:
        yield
    finally:
        _TS_POOL.reset(token)
        if set_env:
            os.environ.pop(_TS_SLAB_ENV, None)


async def _ts_stage_slab(self: Any, executor: Any = None) -> memoryview:
    """``BatchedBufferStager.stage_buffer``: within our takes, one copy per
    batched tensor (the stock one zero-fills a new ``bytearray`` and copies
    each tensor's staged buffer into it, on the training thread).

    Each contiguous CPU tensor is copied straight into its byte range of the
    slab (the same bytes as the stock stager), before the take returns, so
    training may change the tensor right after. Anything else (GPU or UVM
    tensors) goes through its own stager as before.
    """
    pool = _TS_POOL.get()
    if pool is None:
        return await _TS_STOCK["slab"](self, executor)
    from torchsnapshot.batcher import is_batchable

    buf = pool.take(self.slab_sz_bytes)
    slab = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    for (start, end), stager in self.byte_range_to_buffer_stager.items():
        tensor = getattr(stager, "tensor", None)
        if is_batchable(stager) and _plain_cpu_tensor(tensor):
            src = _as_bytes(tensor)
        else:
            src = torch.frombuffer(memoryview(await stager.stage_buffer(executor=executor)).cast("B"),
                                   dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        if src.numel() != end - start:
            raise AssertionError(f"staged {src.numel()} bytes for the slab range {start}-{end}")
        slab[start:end].copy_(src)
    return memoryview(buf)


async def _ts_stage_tensor(self: Any, executor: Any = None) -> Any:
    """``TensorBufferStager.stage_buffer``: within our async takes, a CPU
    tensor serialised with the buffer protocol is copied (into a pooled
    buffer) before the take returns; everything else as stock (a sync take
    may read the live tensor: it returns only after the upload)."""
    pool = _TS_POOL.get()
    tensor = self.tensor
    if pool is None or not self.is_async_snapshot or self._tensor_prepare_func is not None:
        return await _TS_STOCK["tensor"](self, executor)
    from torchsnapshot.serialization import Serializer

    if self.entry.serializer != Serializer.BUFFER_PROTOCOL.value or not isinstance(tensor, torch.Tensor) \
            or tensor.device.type != "cpu":
        return await _TS_STOCK["tensor"](self, executor)
    if not _plain_cpu_tensor(tensor):
        tensor = tensor.detach().contiguous()  # a copy already, and what the stock stager sends
        if not _plain_cpu_tensor(tensor):
            return await _TS_STOCK["tensor"](self, executor)
    src = _as_bytes(tensor)
    buf = pool.take(src.numel())
    if src.numel():
        torch.frombuffer(buf, dtype=torch.uint8).copy_(src)
    return memoryview(buf)


class PeerWriteFailed(RuntimeError):
    """Another rank's part of a synchronous torchsnapshot take failed (this rank's succeeded)."""


def _take_agreed(url: str, *, app_state: dict[str, Any], pg: Any, flag_pg: Any, replicated: list[str],
                 storage_options: Mapping[str, Any]) -> None:
    """torchsnapshot 0.1.0's ``Snapshot.take`` with its closing barrier
    replaced by an agreement on the outcome (collective).

    The stock ``take`` ends with a barrier before rank 0 writes
    ``.snapshot_metadata``, and a rank whose upload raised leaves it: the
    other ranks wait in that barrier until the group's timeout (30 min by
    default). Here every rank, once its own uploads are over (done or
    failed), all-reduces "did mine fail" on the gloo ``flag_pg``: a rank
    never waits for anything but the other ranks' uploads, so no timeout
    has to guess how long a save may take. A failure anywhere raises on
    every rank (this rank's own error, or :class:`PeerWriteFailed`) and
    ``.snapshot_metadata`` is not written; else rank 0 writes it and its
    outcome is broadcast (:func:`_dist.on_rank0`). The same steps as the
    stock ``take`` otherwise, through its own helpers (the version guard,
    :mod:`.versions`, pins the torchsnapshot they come from).
    """
    import asyncio

    from torchsnapshot import Snapshot
    from torchsnapshot.pg_wrapper import PGWrapper
    from torchsnapshot.storage_plugin import url_to_storage_plugin_in_event_loop

    Snapshot._validate_app_state(app_state)
    loop = asyncio.new_event_loop()
    storage: Any = None
    error: Exception | None = None
    try:
        # Collectives (path, replicated entries, keys, manifest, memory budget) run on every rank before any
        # upload starts; an upload error is the one kind of failure that strikes one rank alone.
        path, coalesced = Snapshot._coalesce_path_and_replicated(
            path=url, pg_wrapper=PGWrapper(pg=pg), app_state=app_state, replicated=replicated)
        storage = url_to_storage_plugin_in_event_loop(url_path=path, event_loop=loop,
                                                      storage_options=dict(storage_options))
        try:
            pending, metadata = Snapshot._take_impl(
                path=path, app_state=app_state, replicated=coalesced, pg_wrapper=PGWrapper(pg=pg), storage=storage,
                event_loop=loop, is_async_snapshot=False)
            pending.sync_complete(event_loop=loop)
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every rank
            error = e
            _cancel_uploads(loop)
        if _dist.all_reduce_max([int(error is not None)], pg=flag_pg)[0]:
            if error is not None:
                raise error
            raise PeerWriteFailed(f"another rank's upload of {url} failed")
        _dist.on_rank0(lambda: Snapshot._write_snapshot_metadata(snapshot_metadata=metadata, storage=storage,
                                                                  event_loop=loop),
                       pg=flag_pg, what=f"writing {url}/.snapshot_metadata")
    finally:
        if storage is not None:
            storage.sync_close(event_loop=loop)
        loop.close()


def _cancel_uploads(loop: Any) -> None:
    """Cancel the uploads still running in ``loop`` after one failed (this rank stops writing)."""
    import asyncio

    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class TorchSnapshotSnapshotter(Snapshotter):
    """Snapshots with torchsnapshot, through this project's ``tjs3`` S3 plugin.

    Args:
        replicated: torchsnapshot glob patterns of replicated entries.
        reuse_staging: Keep the staging buffers (slabs of batched tensors;
            with async saves, copies of the other CPU tensors too) for the
            next save (:class:`_SlabPool`): up to one CPU copy of the state
            held between saves; ``False`` allocates them every save.
        **kwargs: See :class:`~trainingjob_trainer.snapshotter.Snapshotter`.
    """

    backend = BACKEND_TORCHSNAPSHOT

    def __init__(self, *, replicated: list[str] | None = None, reuse_staging: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replicated = list(replicated or [])
        self._slabs = _SlabPool(keep=reuse_staging)
        # Import torchsnapshot now (~1.1 s here: it imports DTensor) rather
        # than inside the first save, where it would stall training.
        import torchsnapshot  # noqa: F401

    def _free_kept_buffers(self) -> None:
        self._slabs.clear()

    def _write(self, uri: str, app_state: Mapping[str, Any], *, asynchronous: bool,
               prepare: Any = None) -> PendingWrite | None:
        from torchsnapshot import Snapshot

        url = s3.to_torchsnapshot_url(uri)
        pool = self._slabs
        # The tjs3 plugin reports each object it wrote (key, size, S3's ETag) for the commit marker.
        opts = {**self.storage_options, s3.RECORD_WRITES_OPTION: self._record_write} if s3.is_s3(uri) \
            else self.storage_options
        try:
            with _ts_tuning(pool):  # batching is planned and staged inside take/async_take
                if asynchronous:
                    pending = Snapshot.async_take(
                        url, app_state=dict(app_state), pg=self.pg, replicated=self.replicated, storage_options=opts,
                    )
                else:
                    _take_agreed(url, app_state=dict(app_state), pg=self.pg, flag_pg=self._flag_pg,
                                 replicated=self.replicated, storage_options=opts)
        except BaseException:
            pool.settle(ok=False)
            raise
        if not asynchronous:
            pool.settle(ok=True)
            return None

        def wait() -> None:
            try:
                pending.wait()
            except BaseException:
                pool.settle(ok=False)
                raise
            pool.settle(ok=True)

        return PendingWrite(done=pending.done, wait=wait)

    def _read(self, uri: str, app_state: Mapping[str, Any]) -> None:
        from torchsnapshot import Snapshot

        _ts_install()
        _init_optimizer_states(app_state)
        snapshot = Snapshot(s3.to_torchsnapshot_url(uri), pg=self.pg, storage_options=self.storage_options)
        snapshot.restore(dict(app_state))

    def _stored_keys(self, uri: str) -> set[str] | None:
        from torchsnapshot import Snapshot

        manifest = Snapshot(s3.to_torchsnapshot_url(uri), pg=self.pg, storage_options=self.storage_options).get_manifest()
        # Manifest paths are "<rank or replicated>/<key>/...".
        return {p.split("/")[1] for p in manifest if p.count("/") >= 1}
