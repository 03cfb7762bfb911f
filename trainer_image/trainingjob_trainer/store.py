"""The snapshot store: one job's snapshot folders in S3 and the completion rule.

Layout (from the contract): ``<root>/epoch_{e}_train_step_{s}/...`` with the
commit marker :data:`contract.COMMIT_MARKER` written last by the save that
produced the folder. A folder is restorable only if
:func:`contract.snapshot_is_complete` says so for its marker and its current
listing (every object present with the recorded size and ETag), so a killed
save, a re-used folder or a late stale upload is never restored.

The store never decides by modification time: snapshots are ordered by their
parsed ``(step, epoch)``.

Fencing (issue 11 item 4): the operator writes :data:`contract.FENCE_OBJECT`
before it creates a gang (:meth:`SnapshotStore.write_fence`). A store opened
for a writer (``writer=Writer(attempt, job_uid)``) reads it before every
commit, before emptying a folder and before each deletion of a prune, and
refuses (:class:`Fenced`) when it names a newer attempt; every scan applies
its restore rule (:func:`contract.fence_admits`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from trainingjob_trainer import contract, s3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot folder as seen in one listing.

    Attributes:
        uri: Full URI of the folder.
        name: The folder name (``epoch_E_train_step_S``).
        epoch: Parsed epoch.
        step: Parsed step.
        marker: The parsed commit marker, ``None`` if absent or malformed.
        complete: Whether the completion rule holds right now.
        foreign_version: The version of a marker written by another release
            (never restored, never pruned), else ``None``.
        listing: Relative path -> ``{"size", "etag"}`` of the folder's objects.
    """

    uri: str
    name: str
    epoch: int
    step: int
    marker: contract.CommitMarker | None
    complete: bool
    listing: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    foreign_version: int | None = None
    #: Complete by the completion rule, but written by an older attempt after
    #: the fence (or not admitted by it): never restored.
    fenced: bool = False


@dataclass(frozen=True)
class Writer:
    """Who writes through a store: the gang attempt and the job's uid (``""``: unknown)."""

    attempt: int
    job_uid: str = ""


class Fenced(RuntimeError):
    """A newer attempt owns the job's folder (its fence is in S3): this gang
    must not commit, prune or empty a folder."""


class SnapshotConfigError(RuntimeError):
    """The snapshot storage is unusable as configured (unknown bucket, refused
    credentials): retrying or restarting will not help."""


def config_error(error: BaseException | None) -> SnapshotConfigError | None:
    """``error`` as a :class:`SnapshotConfigError` if it is one (s3fs raises
    ``PermissionError`` for refused credentials or access, and
    ``FileNotFoundError`` "The specified bucket does not exist"), else ``None``."""
    seen = 0
    while error is not None and seen < 8:  # the cause chain (DCP wraps the writers' errors)
        if isinstance(error, SnapshotConfigError):
            return error
        if isinstance(error, PermissionError):
            return SnapshotConfigError(f"S3 refused access: {error}; check the credentials Secret "
                                       "(spec.snapshot.credentialsSecret) and its permissions on the bucket")
        if isinstance(error, FileNotFoundError) and "bucket does not exist" in str(error):
            return SnapshotConfigError(f"{error}: check spec.snapshot.uri (and spec.snapshot.endpoint)")
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def new_save_id(attempt: int) -> str:
    """A unique id for one save: the attempt plus 12 random hex digits."""
    return f"a{int(attempt)}-{uuid.uuid4().hex[:12]}"


class MarkerCache:
    """Commit markers already read, by path and ETag (thread-safe, bounded).

    A reader that lists the same folders again and again (the operator, every
    job once per snapshot interval) gets each marker's ETag from the listing
    and reads the marker only when that ETag is new: a listing of a job with
    three snapshots is then one LIST (and the fence), not one more GET per
    folder. An overwritten marker has another ETag, so it is read again.
    """

    def __init__(self, max_entries: int = 20000) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, etag: str) -> bytes | None:
        if not etag:
            return None
        with self._lock:
            hit = self._entries.get(path)
            if hit is None or hit[0] != etag:
                return None
            self._entries.move_to_end(path)
            return hit[1]

    def put(self, path: str, etag: str, text: bytes) -> None:
        if not etag:
            return
        with self._lock:
            self._entries[path] = (etag, text)
            self._entries.move_to_end(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class SnapshotStore:
    """Lists, commits and prunes the snapshots under one job root.

    Args:
        root: The job's snapshot folder (``s3://bucket/prefix/ns/name`` or a
            local path).
        storage_options: s3fs options over the contract env.
        writer: The gang writing through this store; its commits, prunes and
            folder clearing are checked against the fence. ``None``: a
            reader (the operator, a CLI), never refused.
        marker_cache: Markers read before, reused while the listing shows the
            same ETag (the operator's listings; see :class:`MarkerCache`).
    """

    def __init__(self, root: str, *, storage_options: Mapping[str, Any] | None = None,
                 writer: Writer | None = None, marker_cache: MarkerCache | None = None) -> None:
        self.root = root.rstrip("/")
        self.marker_cache = marker_cache
        self.storage_options = dict(storage_options or {})
        self.writer = writer
        self.fs, self._root_path = s3.filesystem(self.root, self.storage_options)
        #: The ``_tj/`` objects of the last :meth:`scan`'s listing (path relative to the root -> size, etag).
        self.live: dict[str, Mapping[str, Any]] = {}

    # ------------------------------------------------------------------ paths
    def uri_for(self, *, epoch: int, step: int) -> str:
        """URI of the folder for ``epoch``/``step`` (contract naming)."""
        return s3.join(self.root, contract.snapshot_dir_name(epoch, step))

    def _path(self, name: str) -> str:
        return f"{self._root_path}/{name}"

    # ---------------------------------------------------------------- fencing
    def read_fence(self) -> contract.Fence | None:
        """The fence in S3 (``None``: none, or one this release cannot parse)."""
        try:
            text = s3.cat_small(self.fs, f"{self._root_path}/{contract.FENCE_OBJECT}")
        except FileNotFoundError:
            return None
        fence = contract.Fence.from_json(text)
        if fence is None:
            logger.warning("%s/%s does not parse; ignored", self.root, contract.FENCE_OBJECT)
        return fence

    def check_fence(self, what: str) -> None:
        """Raise :class:`Fenced` if the fence forbids this store's writer to do ``what``.

        Raises:
            Fenced: A newer attempt (or another job of the same name) owns the folder.
        """
        if self.writer is None:
            return
        why = contract.fence_refusal(self.read_fence(), attempt=self.writer.attempt, job_uid=self.writer.job_uid)
        if why:
            logger.error("fenced: not %s: %s", what, why)
            raise Fenced(f"fenced: not {what}: {why}")

    def write_fence(self, *, attempt: int, job_uid: str) -> contract.Fence:
        """The operator's side: record ``attempt`` as the folder's owner (before its pods exist).

        Idempotent per attempt: a fence already written for this attempt (or
        a later one) of the same job is kept as it is, so its ``admitted``
        set is never widened by a later listing. Otherwise the complete
        snapshots of one listing made now (under the fence in place) become
        the new fence's ``admitted`` set, and the fence is written after it.

        Returns:
            The fence in force.
        """
        old = self.read_fence()
        if old is not None and old.job_uid == job_uid and old.attempt >= int(attempt):
            return old
        admitted = {i.name: i.marker.save_id for i in self.scan(fence=old) if i.complete and i.marker is not None}
        fence = contract.Fence(attempt=int(attempt), job_uid=job_uid, admitted=admitted,
                               written_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.fs.pipe_file(f"{self._root_path}/{contract.FENCE_OBJECT}", fence.to_json().encode())
        self.fs.invalidate_cache()
        return fence

    def _info(self, *, uri: str, name: str, listing: dict[str, dict[str, Any]], fs: Any, path: str,
              fence: contract.Fence | None) -> SnapshotInfo:
        """One folder's state: its marker, the completion rule and the fence's restore rule."""
        epoch, step = contract.parse_snapshot_dir_name(name)  # type: ignore[misc]
        marker, foreign = (self._marker_at(fs, path, etag=listing[contract.COMMIT_MARKER].get("etag") or "")
                           if contract.COMMIT_MARKER in listing else (None, None))
        complete = contract.snapshot_is_complete(marker, name, listing)
        fenced = complete and marker is not None and not contract.fence_admits(fence, dir_name=name, marker=marker)
        return SnapshotInfo(uri=uri, name=name, epoch=epoch, step=step, marker=marker, complete=complete and not fenced,
                            listing=listing, foreign_version=foreign, fenced=fenced)

    # ---------------------------------------------------------------- listing
    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        prefix = path.rstrip("/") + "/"
        for p, info in found.items():
            p = p.rstrip("/")
            if info.get("type") == "directory" or not p.startswith(prefix):
                continue
            out[p[len(prefix):]] = {
                "size": int(info.get("size") or 0),
                "etag": str(info.get("ETag") or info.get("etag") or "").strip('"'),
            }
        return out

    def _marker_at(self, fs: Any, path: str, *, etag: str = "") -> tuple[contract.CommitMarker | None, int | None]:
        """The marker in folder ``path`` and, when another release wrote it, its version.

        ``etag``: the marker's ETag in the listing; with a :attr:`marker_cache`
        a marker read before under that ETag is not read again.
        """
        key = f"{path}/{contract.COMMIT_MARKER}"
        text = self.marker_cache.get(key, etag) if self.marker_cache is not None else None
        if text is None:
            try:
                text = s3.cat_small(fs, key)
            except FileNotFoundError:
                return None, None
            if self.marker_cache is not None:
                self.marker_cache.put(key, etag, text)
        version = contract.marker_version(text)
        foreign = version if version is not None and version != contract.COMMIT_MARKER_VERSION else None
        return contract.CommitMarker.from_json(text), foreign

    _NO_FENCE: Any = object()

    def scan(self, *, fence: Any = _NO_FENCE) -> list[SnapshotInfo]:
        """Every snapshot folder under the root, oldest first (by step, epoch).

        One GET of the fence (``fence``: the one to apply instead), one
        recursive listing, plus one GET per folder that has a marker.
        The ``_tj/`` live objects of that listing are kept in :attr:`live`
        (:func:`contract.live_entries`) for the operator.
        """
        return self.scan_with_live(fence=fence)[0]

    def scan_with_live(self, *, fence: Any = _NO_FENCE) -> tuple[list[SnapshotInfo], dict[str, Mapping[str, Any]]]:
        """:meth:`scan`, and the ``_tj/`` live objects found in the same listing.

        Returns:
            ``(snapshots, live)``: ``live`` is :func:`contract.live_entries` of
            the listing (``{PROGRESS_OBJECT: {"size", "etag"}, ...}``), so the
            operator reads the progress object only when its ETag changed.
        """
        fence = self.read_fence() if fence is SnapshotStore._NO_FENCE else fence
        by_dir: dict[str, dict[str, dict[str, Any]]] = {}
        everything = self._find(self._root_path)
        self.live = contract.live_entries(everything)
        for rel, meta in everything.items():
            if "/" not in rel:
                continue
            d, inner = rel.split("/", 1)
            if contract.parse_snapshot_dir_name(d) is not None:
                by_dir.setdefault(d, {})[inner] = meta
        infos = [self._info(uri=s3.join(self.root, name), name=name, listing=listing, fs=self.fs,
                            path=self._path(name), fence=fence) for name, listing in by_dir.items()]
        infos.sort(key=lambda i: contract.snapshot_order(i.name, i.marker) if i.complete and i.marker
                   else (i.step, i.epoch, "", False))
        return infos, contract.live_entries(everything)

    def inspect(self, uri: str) -> SnapshotInfo | None:
        """The state of one snapshot folder given by full URI (``None`` if not one)."""
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        parsed = contract.parse_snapshot_dir_name(name)
        if parsed is None:
            return None
        fs, path = s3.filesystem(uri, self.storage_options)
        # The fence of the folder holding ``uri`` (another job's snapshot: that job's fence).
        fence = SnapshotStore(uri.rstrip("/").rsplit("/", 1)[0], storage_options=self.storage_options).read_fence() \
            if uri.rstrip("/").rsplit("/", 1)[0] != self.root else self.read_fence()
        return self._info(uri=uri.rstrip("/"), name=name, listing=self._find(path), fs=fs, path=path, fence=fence)

    def latest_complete(self) -> SnapshotInfo | None:
        """The newest restorable snapshot by parsed (step, epoch), or ``None``.

        The folder's state from the one :meth:`scan` that chose it: the fence,
        the job's LIST and its markers (it was inspected again after the scan,
        3 more requests before every restore, for the same answer).
        """
        complete = [i for i in self.scan() if i.complete]
        best = contract.pick_latest([(i.name, i.marker) for i in complete])  # type: ignore[misc]
        if best is None:
            return None
        return next(i for i in complete if i.name == best[0])

    def check_access(self) -> None:
        """One small listing of the root, so that an unknown bucket or refused
        credentials fail here, clearly, rather than as an empty job folder.

        Raises:
            SnapshotConfigError: The bucket does not exist, or S3 refused the credentials.
        """
        if not s3.is_s3(self.root):
            return
        bucket, _, prefix = self._root_path.partition("/")
        try:
            self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
        except (PermissionError, FileNotFoundError) as e:
            raise config_error(e) or SnapshotConfigError(f"cannot list {self.root}: {e}") from e

    # ----------------------------------------------------------------- writes
    def folder_for_save(self, *, epoch: int, step: int, save_id: str) -> str:
        """The folder a new save writes: the step's own name when nothing is
        there, else the name tagged with ``save_id`` beside it (issue 8 item 3).

        A folder that holds objects is another save's: a complete snapshot of
        another run at the same step (after an explicit resume from an older
        snapshot), or leftovers of a killed or fenced save, whose writer may
        still be uploading (a partitioned node). A save never writes into it.

        Returns:
            The folder name.
        """
        name = contract.snapshot_dir_name(epoch, step)
        if self._find(self._path(name)):
            tagged = contract.snapshot_dir_name(epoch, step, tag=save_id)
            logger.info("%s holds another save's objects; this save goes beside it, into %s", name, tagged)
            return tagged
        return name

    def begin(self, *, epoch: int, step: int, name: str | None = None) -> str:
        """Prepare a folder for a new save: drop its marker FIRST, then its objects.

        A save killed after this leaves a folder without a marker, which is
        never restored, even if it still holds a previous save's objects.

        Args:
            name: The folder (:meth:`folder_for_save`); default: the step's own name.

        Returns:
            The folder URI.

        Raises:
            Fenced: A newer attempt owns the job's folder.
        """
        name = name or contract.snapshot_dir_name(epoch, step)
        self.check_fence(f"emptying {name} for a save")
        path = self._path(name)
        marker_path = f"{path}/{contract.COMMIT_MARKER}"
        try:
            self.fs.rm_file(marker_path)
        except FileNotFoundError:
            pass
        self._rm_tree(path)
        return s3.join(self.root, name)

    def commit(
        self,
        *,
        epoch: int,
        step: int,
        save_id: str,
        attempt: int,
        backend: str,
        seconds: float,
        emergency: bool = False,
        written: Mapping[str, Mapping[str, Any]] | None = None,
        name: str | None = None,
    ) -> contract.CommitMarker:
        """Write the commit marker of a finished save (all ranks' writes done).

        The fence is read first: a fenced gang never writes a marker.

        Args:
            name: The save's folder (:meth:`folder_for_save`); default: the step's own name.
            written: Every object the save wrote (path, with or without the
                scheme -> ``{"size", "etag"}`` as S3 answered its PUT). The
                marker then lists exactly those; other objects in the folder
                are left out (logged), and if one of them is missing or
                differs in the listing the commit fails. ``None`` (backends
                that do not report writes: local folders): every object listed.

        An object replaced after the commit (a stale upload) changes its ETag
        and makes the snapshot incomplete.

        Raises:
            RuntimeError: Nothing to commit, or an object of the save was
                replaced or removed before the commit.
            Fenced: A newer attempt owns the job's folder.
        """
        name = name or contract.snapshot_dir_name(epoch, step)
        self.check_fence(f"committing {name}")
        listing = self._find(self._path(name))
        listing.pop(contract.COMMIT_MARKER, None)
        if written is not None:
            listing = self._objects_written(name, listing, written)
        if not listing:
            raise RuntimeError(f"snapshot {name} has no objects; refusing to commit it")
        marker = contract.CommitMarker(
            save_id=save_id,
            attempt=int(attempt),
            epoch=int(epoch),
            step=int(step),
            backend=backend,
            objects=listing,
            saved_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            seconds=round(float(seconds), 3),
            emergency=emergency,
            job_uid=self.writer.job_uid if self.writer else "",
        )
        self.fs.pipe_file(f"{self._path(name)}/{contract.COMMIT_MARKER}", marker.to_json().encode())
        return marker

    def _objects_written(self, name: str, listing: dict[str, dict[str, Any]],
                         written: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        prefix = f"{self._path(name)}/"
        mine: dict[str, Mapping[str, Any]] = {}
        for path, meta in written.items():
            p = path.split("://", 1)[-1]
            if not p.startswith(prefix):
                raise RuntimeError(f"snapshot {name}: the save wrote {path}, outside its folder")
            mine[p[len(prefix):]] = meta
        changed = sorted(k for k, m in mine.items() if k not in listing
                         or int(listing[k]["size"]) != int(m["size"])
                         or (str(m.get("etag") or "") and listing[k]["etag"] != str(m["etag"]).strip('"')))
        if changed:
            raise RuntimeError(f"snapshot {name}: {len(changed)} of its objects were replaced or removed before "
                               f"the commit (first: {changed[0]}); refusing to commit it")
        strays = sorted(set(listing) - set(mine))
        if strays:
            logger.warning("snapshot %s: %d objects the save did not write are left out of its marker (first: %s)",
                           name, len(strays), strays[0])
        return {k: listing[k] for k in mine}

    def _rm_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def delete(self, uri: str) -> None:
        """Delete one snapshot folder: its marker first, so it is never half-visible."""
        fs, path = s3.filesystem(uri, self.storage_options)
        try:
            fs.rm_file(f"{path}/{contract.COMMIT_MARKER}")
        except FileNotFoundError:
            pass
        self._rm_tree(path)

    def prune(
        self,
        *,
        keep_last: int | None,
        protect: set[str] | frozenset[str] = frozenset(),
    ) -> list[str]:
        """Apply retention; returns the URIs deleted.

        Keeps the ``keep_last`` newest complete snapshots (always at least the
        newest one) and everything in ``protect`` (the snapshot the current
        attempt restored from, a save in flight). Incomplete folders outside
        ``protect`` are leftovers of killed or fenced saves and are deleted.
        Nothing is deleted when ``keep_last`` is ``None``. A folder whose
        marker another release wrote (an unknown version: a newer image
        before a rollback) is never deleted. The fence is read before the
        scan and again before each deletion: a fenced gang deletes nothing.

        Raises:
            Fenced: A newer attempt owns the job's folder.
        """
        if keep_last is None:
            return []
        self.check_fence("pruning")
        protect = {p.rstrip("/") for p in protect}
        infos = self.scan()
        complete = [i for i in infos if i.complete]
        keep = {i.uri for i in complete[-max(1, int(keep_last)):]}
        deleted = []
        for info in infos:
            if info.uri in keep or info.uri in protect:
                continue
            if info.foreign_version is not None:
                logger.info("keeping %s: its commit marker has version %d, unknown to this release",
                            info.uri, info.foreign_version)
                continue
            t0 = time.monotonic()
            self.check_fence(f"pruning {info.name}")
            self.delete(info.uri)
            logger.info("pruned %s (%s) in %.2fs", info.uri, "complete" if info.complete else "incomplete", time.monotonic() - t0)
            deleted.append(info.uri)
        return deleted
