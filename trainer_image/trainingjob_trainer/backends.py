"""The two snapshot backends: torchsnapshot and torch.distributed.checkpoint.

Each implements only the I/O of :class:`~trainingjob_trainer.snapshotter.Snapshotter`
(``_write`` and ``_read``); naming, commit and retention live in the base.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
from typing import Any, Mapping

import torch

from trainingjob_trainer import _dist, contract, s3
from trainingjob_trainer.snapshotter import PendingWrite, Snapshotter, env_int

#: The versions whose internals this module patches or builds on, by
#: distribution: torchsnapshot's two stagers are replaced
#: (:func:`_ts_install`), DCP's ``FsspecWriter`` is subclassed with its
#: private ``_write_data``/``_split_by_size_and_type``/``_item_size``, and
#: torch's private ``_state_dict_utils`` copy the async state. Another version
#: may change any of them without notice, so it fails at import, clearly,
#: instead of saving wrong snapshots. To try one: check those internals,
#: run ``tests/trainer``, then add it here.
TESTED_VERSIONS: dict[str, tuple[str, ...]] = {
    "torch": ("2.13.0",),
    "torchsnapshot-nightly": ("2024.7.26",),
}


def check_versions(installed: Mapping[str, str | None], tested: Mapping[str, tuple[str, ...]] = TESTED_VERSIONS) -> None:
    """Raise ``ImportError`` if an installed distribution has an untested version.

    Args:
        installed: Distribution -> version (``None``: not installed, e.g.
            torchsnapshot in a DCP-only image; its patches then never run).
            A local suffix (``2.13.0+cpu``) is ignored.
        tested: Distribution -> the versions this module was tested with.
    """
    for dist_name, versions in tested.items():
        have = installed.get(dist_name)
        if have is not None and have.split("+", 1)[0] not in versions:
            raise ImportError(
                f"trainingjob_trainer.backends patches internals of {dist_name} and was tested with "
                f"{', '.join(versions)} only; {have} is installed. Install {dist_name}=={versions[-1]} "
                f"(see constraints.txt), or check the patched internals and extend TESTED_VERSIONS")


def _installed_versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in TESTED_VERSIONS:
        if name != "torch":
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
    return out


check_versions(_installed_versions())

BACKEND_TORCHSNAPSHOT = "torchsnapshot"
BACKEND_DCP = "dcp"
#: Chosen from docs/benchmarks.md ("Snapshots"): at 256 MiB and 1 GiB DCP
#: saved faster than torchsnapshot in every run and stalled training least.
#: TorchTNT's ``TorchSnapshotSaver`` keeps torchsnapshot unless told otherwise.
DEFAULT_BACKEND = BACKEND_DCP


def _init_optimizer_states(app_state: Mapping[str, Any]) -> None:
    """Create lazily-initialised optimizer state so it can be loaded in place."""
    from torchtnt.utils.optimizer import init_optim_state

    for value in app_state.values():
        if isinstance(value, torch.optim.Optimizer):
            init_optim_state(value)


#: torchsnapshot packs tensors smaller than this into slabs of this size, one
#: object each (default 128 MiB: a 256 MiB state of 4 MiB tensors became two
#: 124 MiB objects, two uploads wide, 0.3x the raw upload). With this
#: package's one-copy slab staging, 4 MiB slabs saved 256 MiB of 1 MiB
#: tensors in 1.02 s, 8 MiB in 1.15 s, 16 MiB in 1.19 s (steady state, here).
#: ``$TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE`` set by the user wins.
TS_SLAB_BYTES = 4 << 20
_TS_SLAB_ENV = "TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE"


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


#: The buffer pool of the :class:`TorchSnapshotSnapshotter` take in progress
#: (:func:`_ts_tuning`); a context variable, so takes in other threads, or by
#: other code, get torchsnapshot's stock staging.
_TS_POOL: contextvars.ContextVar[_SlabPool | None] = contextvars.ContextVar("tj_ts_pool", default=None)
_TS_STOCK: dict[str, Any] = {}


def _ts_install() -> None:
    """Wrap torchsnapshot's two CPU stagers, once per process; the wrappers
    do this package's staging only inside :func:`_ts_tuning`."""
    if _TS_STOCK:
        return
    from torchsnapshot import batcher
    from torchsnapshot.io_preparers import tensor as ts_tensor

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


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes as a flat uint8 view (no copy): what
    torchsnapshot's ``tensor_as_memoryview`` serialises."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _plain_cpu_tensor(tensor: Any) -> bool:
    from torchsnapshot.uvm_tensor import is_uvm_tensor

    return (isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous()
            and not is_uvm_tensor(tensor))


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
                    Snapshot.take(
                        url, app_state=dict(app_state), pg=self.pg, replicated=self.replicated, storage_options=opts,
                    )
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

        _init_optimizer_states(app_state)
        snapshot = Snapshot(s3.to_torchsnapshot_url(uri), pg=self.pg, storage_options=self.storage_options)
        snapshot.restore(dict(app_state))

    def _stored_keys(self, uri: str) -> set[str] | None:
        from torchsnapshot import Snapshot

        manifest = Snapshot(s3.to_torchsnapshot_url(uri), pg=self.pg, storage_options=self.storage_options).get_manifest()
        # Manifest paths are "<rank or replicated>/<key>/...".
        return {p.split("/")[1] for p in manifest if p.count("/") >= 1}


#: Target size of one DCP object: small tensors are packed together up to
#: this size (one PUT each), tensors at least this large get an object each.
DCP_OBJECT_BYTES = 16 << 20
#: Upper bound on DCP upload threads per rank; the count used is sized to the
#: save (one per object) and the CPUs (:func:`_dcp_auto_threads`).
DCP_MAX_THREADS = 16
#: Objects up to this size are built in memory and sent with one PUT; larger
#: ones stream through s3fs (multipart) so a huge tensor is never copied whole.
DCP_SINGLE_PUT_BYTES = 64 << 20


class DCPSnapshotter(Snapshotter):
    """Snapshots with torch.distributed.checkpoint over fsspec/s3fs.

    On S3 the writer is :func:`_dcp_s3_writer`'s (see there); elsewhere DCP's
    stock ``FsspecWriter`` with the same file layout.

    Args:
        thread_count: Upload threads per rank; ``None`` sizes it to the save
            and the CPUs (:func:`_dcp_auto_threads`).
        single_file_per_rank: DCP's file layout knob: one object per thread
            instead of objects of about ``object_bytes``.
        object_bytes: Target object size (see :data:`DCP_OBJECT_BYTES`); ``0``
            writes one object per tensor.
        reuse_staging: Async saves copy the state into CPU staging buffers
            (:func:`_dcp_stager`) that are kept for the next save, so only
            the first async save allocates them: 1 GiB staged in 0.30 s into
            new memory, 0.07 s into the kept buffers (docs/benchmarks.md).
            The cost is one CPU copy of the state held between saves;
            ``False`` allocates new buffers for each save.
        **kwargs: See :class:`~trainingjob_trainer.snapshotter.Snapshotter`.
    """

    backend = BACKEND_DCP
    _prepares_async_writes = True

    def __init__(
        self,
        *,
        thread_count: int | None = None,
        single_file_per_rank: bool = False,
        object_bytes: int = DCP_OBJECT_BYTES,
        reuse_staging: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.thread_count = thread_count
        self.single_file_per_rank = single_file_per_rank
        self.object_bytes = int(object_bytes)
        self.reuse_staging = reuse_staging
        self._stager: Any = None
        # An async save plans and commits with collectives from its upload
        # thread; on the training's own group they would interleave with the
        # training's collectives (DDP's all-reduces) in a different order on
        # each rank: 4 DDP ranks on gloo aborted within a few steps.
        self._async_pg = _dist.new_gloo_group(self.pg) if self.async_save else None
        # Import DCP now (~0.7 s on this machine) rather than inside the first
        # save, where it would stall training.
        _dcp_s3_writer()
        _dcp_stager()

    def _fs_kwargs(self, uri: str) -> dict[str, Any]:
        return s3.storage_options_from_env(self.storage_options) if s3.is_s3(uri) else {}

    def _writer(self, uri: str, prepare: Any = None):
        if s3.is_s3(uri):
            return _dcp_s3_writer()(
                uri, thread_count=self.thread_count, single_file_per_rank=self.single_file_per_rank,
                object_bytes=self.object_bytes, prepare=prepare, record=self._record_write, **self._fs_kwargs(uri),
            )
        if prepare is not None:
            prepare()
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(
            uri, thread_count=self.thread_count or 4, single_file_per_rank=self.single_file_per_rank,
            sync_files=False,
        )

    def _write(self, uri: str, app_state: Mapping[str, Any], *, asynchronous: bool,
               prepare: Any = None) -> PendingWrite | None:
        import torch.distributed.checkpoint as dcp

        writer = self._writer(uri, prepare)
        if asynchronous:
            if self._async_pg is None:  # save(asynchronous=True) without async_save
                self._async_pg = _dist.new_gloo_group(self.pg)  # collective, like save()
            if self._stager is None:
                self._stager = _dcp_stager()(keep=self.reuse_staging)
            # save() waited for the previous save, so no upload still reads
            # the kept buffers when they are overwritten here.
            fut = dcp.async_save(dict(app_state), storage_writer=writer, process_group=self._async_pg,
                                 async_stager=self._stager)
            fut = getattr(fut, "upload_completion", fut)
            return PendingWrite(done=fut.done, wait=fut.result)
        dcp.save(dict(app_state), storage_writer=writer, process_group=self.pg)
        return None

    def _free_kept_buffers(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _read(self, uri: str, app_state: Mapping[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        _init_optimizer_states(app_state)
        reader = FsspecReader(uri, **self._fs_kwargs(uri))
        dcp.load(dict(app_state), storage_reader=reader, process_group=self.pg)

    def _stored_keys(self, uri: str) -> set[str] | None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        metadata = FsspecReader(uri, **self._fs_kwargs(uri)).read_metadata()
        return {k.split(".", 1)[0] for k in metadata.state_dict_metadata}


def _dcp_auto_threads(n_objects: int) -> int:
    """Upload threads for a save of ``n_objects`` objects.

    Each thread serialises its tensors and hands the bytes to s3fs under the
    GIL, so beyond about two threads per CPU they only contend (measured on
    2 CPUs with the S3 server on the same machine: 16 threads were slower
    than 4); never fewer than 4, so S3 latency stays hidden on small hosts.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(n_objects, DCP_MAX_THREADS, max(4, 2 * cpus)))


def _pack_items(items: list, sizes: list[int], target: int) -> list[list]:
    """Group write items into objects of about ``target`` bytes.

    An item of ``target`` bytes or more is an object of its own; smaller
    items share an object, in plan order, until it would exceed ``target``.
    ``target <= 0``: one object per item.
    """
    if target <= 0:
        return [[it] for it in items]
    files: list[list] = []
    cur: list = []
    cur_bytes = 0
    for it, n in zip(items, sizes):
        if n >= target:
            files.append([it])
            continue
        if cur and cur_bytes + n > target:
            files.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += n
    if cur:
        files.append(cur)
    return files


class _S3Sink(io.RawIOBase):
    """Write side of one DCP object on S3: bytes are kept in one ``bytearray``
    and sent with a single PUT (``bytearray`` is a body botocore takes as is,
    so no further copy); past ``single_put_bytes`` the object switches to an
    s3fs multipart stream. Nothing is uploaded unless :meth:`commit` runs.
    """

    def __init__(self, fs: Any, path: str, single_put_bytes: int, record: Any = None) -> None:
        super().__init__()
        self._fs, self._path, self._limit, self._record = fs, path, single_put_bytes, record
        self._buf: bytearray | None = bytearray()
        self._stream: Any = None
        self._pos = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if self._stream is not None:
            self._stream.write(b)
        else:
            assert self._buf is not None
            self._buf += b
            if len(self._buf) > self._limit:
                self._stream = self._fs.open(self._path, "wb")
                self._stream.write(self._buf)
                self._buf = None
        self._pos += n
        return n

    def close(self) -> None:  # DCP closes the stream before the context exits
        pass

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.close()
            etag = self._fs.info(self._path).get("ETag", "")  # s3fs keeps no PUT answer of a stream
        else:
            assert self._buf is not None
            etag = (self._fs.pipe_file(self._path, self._buf) or {}).get("ETag", "")
        self._buf = None
        if self._record is not None:
            self._record(self._path, self._pos, etag)

    def discard(self) -> None:
        if self._stream is not None:
            self._stream.discard()  # aborts the multipart upload
        self._buf = None


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


_DCP_S3_WRITER: Any = None


def _dcp_s3_writer() -> type:
    """DCP's ``FsspecWriter`` tuned for S3 (built once; imports DCP).

    Same objects and metadata format as the stock writer (any ``FsspecReader``
    reads them); what differs is how they reach S3:

    * tensors are packed into objects of about ``object_bytes`` (fewer PUTs,
      fewer entries in the commit marker) and uploaded by one thread per
      object up to :data:`DCP_MAX_THREADS`;
    * each object is serialised into memory and sent with one PUT
      (:class:`_S3Sink`) instead of through an s3fs buffered file, which
      copies the bytes twice more;
    * ``.metadata`` is PUT under its final name: an S3 PUT is atomic already,
      and DCP's write-tmp-then-rename is a copy plus a delete on S3 (plus two
      existence checks);
    * no ``mkdir`` or "checkpoint already exists" probe: S3 has no folders and
      :meth:`SnapshotStore.begin` emptied the folder before the save;
    * ``prepare`` (an async save's :meth:`SnapshotStore.begin`, rank 0) runs in
      the coordinator's global planning, which every rank's writes wait for,
      so in the upload thread rather than on the training thread.
    """
    global _DCP_S3_WRITER
    if _DCP_S3_WRITER is not None:
        return _DCP_S3_WRITER
    import pickle
    import queue
    from contextlib import contextmanager

    import torch.distributed.checkpoint  # noqa: F401 - the heavy import, done once
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

    class _S3FileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path: Any, mode: str):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            sink = _S3Sink(self.fs, os.fspath(path), DCP_SINGLE_PUT_BYTES, self.record)
            try:
                yield sink
            except BaseException:
                sink.discard()
                raise
            sink.commit()

        def mkdir(self, path: Any) -> None:
            pass  # S3 has no folders

    class S3Writer(FsspecWriter):
        def __init__(self, path: str, *, thread_count: int | None, single_file_per_rank: bool,
                     object_bytes: int, prepare: Any = None, record: Any = None, **fs_kwargs: Any) -> None:
            super().__init__(path, single_file_per_rank=single_file_per_rank, sync_files=False,
                             thread_count=thread_count or 1, **fs_kwargs)
            self._auto_threads = thread_count is None
            self.object_bytes = object_bytes
            self._prepare = prepare
            fs = _S3FileSystem()
            fs.fs = self.fs.fs
            fs.record = record  # each object written: (path, size, S3's ETag), for the commit marker
            self.fs = fs

        def _metadata_exists(self) -> bool:
            return False  # SnapshotStore.begin() emptied the folder

        def prepare_global_plan(self, plans: Any) -> Any:
            # The coordinator only; the other ranks write after its plan.
            if self._prepare is not None:
                prepare, self._prepare = self._prepare, None
                prepare()
            return super().prepare_global_plan(plans)

        def write_data(self, plan: Any, planner: Any) -> Any:
            items = list(plan.items)
            if self.single_file_per_rank:
                n = self.thread_count if not self._auto_threads else _dcp_auto_threads(len(items))
                files = [f for f in dcp_fs._split_by_size_and_type(max(1, min(n, len(items))), items) if f]
            else:
                sizes = [dcp_fs._item_size(it) if it.type != dcp_fs.WriteItemType.BYTE_IO else 0 for it in items]
                files = _pack_items(items, sizes, self.object_bytes)
            if self._auto_threads:
                self.thread_count = _dcp_auto_threads(len(files))
            file_queue: queue.Queue = queue.Queue()
            for i, group in enumerate(files):
                name = f"{plan.storage_data.prefix}{i}{dcp_fs.DEFAULT_SUFFIX}"
                file_queue.put((self.fs.concat_path(self.path, name), name, group))
            return self._write_data(planner, file_queue)

        def finish(self, metadata: Any, results: Any) -> None:
            metadata.version = dcp_fs.CURRENT_DCP_VERSION
            storage_md = {}
            for wr_list in results:
                storage_md.update({wr.index: wr.storage_data for wr in wr_list})
            metadata.storage_data = storage_md
            metadata.storage_meta = self.storage_meta()
            rank = self.rank if (not self.use_collectives and self.rank is not None) else None
            with self.fs.create_stream(self._get_metadata_path(rank), "wb") as f:
                pickle.dump(metadata, f)

    _DCP_S3_WRITER = S3Writer
    return S3Writer


BACKENDS: dict[str, type[Snapshotter]] = {
    BACKEND_TORCHSNAPSHOT: TorchSnapshotSnapshotter,
    BACKEND_DCP: DCPSnapshotter,
}


def make_snapshotter(*, backend: str = DEFAULT_BACKEND, **kwargs: Any) -> Snapshotter:
    """A snapshotter of the named backend (``torchsnapshot`` or ``dcp``)."""
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown snapshot backend {backend!r}; expected one of {sorted(BACKENDS)}") from None
    return cls(**kwargs)


def snapshotter_from_env(*, app_state: Mapping[str, Any] | None = None, **overrides: Any) -> Snapshotter:
    """A snapshotter configured by the operator's contract env (``TJ_*``).

    Reads the snapshot URI, backend, every-steps, keep-last, attempt and
    resume-from; ``overrides`` win over the env.

    Raises:
        ValueError: No snapshot URI in the env or the overrides.
    """
    cfg: dict[str, Any] = {
        "uri": os.environ.get(contract.ENV_SNAPSHOT_URI) or None,
        "backend": os.environ.get(contract.ENV_SNAPSHOT_BACKEND) or DEFAULT_BACKEND,
        "every_steps": env_int(contract.ENV_SNAPSHOT_EVERY_STEPS),
        "keep_last": env_int(contract.ENV_SNAPSHOT_KEEP_LAST),
        "attempt": env_int(contract.ENV_ATTEMPT, 0),
        "resume_from": os.environ.get(contract.ENV_RESUME_FROM) or None,
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if not cfg["uri"]:
        raise ValueError(f"no snapshot URI: set ${contract.ENV_SNAPSHOT_URI}")
    return make_snapshotter(app_state=app_state, **cfg)
