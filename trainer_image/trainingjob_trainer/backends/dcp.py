"""The torch.distributed.checkpoint backend, over fsspec/s3fs."""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

from trainingjob_trainer import _dist, s3
from trainingjob_trainer.backends.base import BACKEND_DCP, _init_optimizer_states
from trainingjob_trainer.backends.dcp_read import _dcp_s3_reader
from trainingjob_trainer.backends.staging import _dcp_stager
from trainingjob_trainer.snapshotter import PendingWrite, Snapshotter

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
        _dcp_s3_reader()
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
        reader = _dcp_s3_reader()(uri, **self._fs_kwargs(uri)) if s3.is_s3(uri) \
            else FsspecReader(uri, **self._fs_kwargs(uri))
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
