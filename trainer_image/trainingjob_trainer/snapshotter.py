"""The plain-loop snapshot API and the base class every backend shares.

:class:`Snapshotter` owns everything that is not backend I/O: frequency,
folder naming (``epoch_{e}_train_step_{s}``), the commit marker, the choice
of the snapshot to restore, retention, async completion and the coordinated
emergency snapshot. A backend implements :meth:`Snapshotter._write` and
:meth:`Snapshotter._read` (see :mod:`trainingjob_trainer.backends`).

Typical use in a plain PyTorch loop::

    snap = snapshotter_from_env(app_state={"train": ModelOptimizerState(model=m, optimizers=[opt])})
    start = snap.restore_latest()            # 0 on a fresh job
    with snap:                               # close(); after an error abandon(): no collective
        for step in range(start + 1, total + 1):
            train_step(step)
            snap.maybe_save(step)            # may raise Preempted (exit code 83)
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from trainingjob_trainer import _dist, contract, s3
from trainingjob_trainer.preemption import (
    Preempted,
    PreemptedDuringRestore,
    PreemptionWatcher,
    write_termination_message,
)
from trainingjob_trainer.progress import LiveMixin, stall_timed
from trainingjob_trainer.store import SnapshotConfigError, SnapshotStore, Writer, config_error, new_save_id

logger = logging.getLogger(__name__)


#: What a failed write or read may raise: DCP's ``CheckpointException`` is a
#: ``BaseException``; interrupts and exits are never caught as failures.
_NOT_FAILURES = (KeyboardInterrupt, SystemExit, GeneratorExit)


class SnapshotNotRestorable(RuntimeError):
    """The snapshot asked for is not complete, or does not fit the state
    being restored (never retried)."""


class RestoreFailed(RuntimeError):
    """Restoring failed on every rank after the retries (storage errors)."""


class SnapshotStorageUnusable(SystemExit):
    """Raised on every rank when S3 refuses the job's snapshot configuration.

    A ``SystemExit`` with :data:`contract.EXIT_SNAPSHOT_CONFIG_ERROR`, after
    a ``SnapshotStorageError`` termination message that says what to fix:
    the operator then fails the job instead of restarting it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(contract.EXIT_SNAPSHOT_CONFIG_ERROR)
        self.message = message


def _storage_unusable(error: SnapshotConfigError, *, step: int | None = None) -> SnapshotStorageUnusable:
    logger.error("snapshot storage unusable: %s", error)
    write_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_SNAPSHOT_CONFIG_ERROR, step=step, message=str(error)))
    return SnapshotStorageUnusable(str(error))


class SnapshotFailed(RuntimeError):
    """A save that had to succeed (the emergency save) failed on every rank."""


class EmergencySnapshotFailed(SystemExit):
    """Raised on every rank when the emergency snapshot could not be taken.

    A ``SystemExit`` with code ``128 + SIGTERM``: the job was preempted
    without a snapshot. The termination message
    (``PreemptedWithoutSnapshot``) names the error.

    Attributes:
        step: The step the snapshot was for.
    """

    def __init__(self, *, step: int) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.step = step


@dataclass
class PendingWrite:
    """A backend write that finishes in the background.

    Attributes:
        done: Returns whether this rank's part of the write has finished.
        wait: Blocks until it has (re-raises its error).
    """

    done: Callable[[], bool]
    wait: Callable[[], None]


@dataclass
class _InFlight:
    uri: str
    epoch: int
    step: int
    save_id: str
    started: float
    emergency: bool
    handle: PendingWrite | None
    error: BaseException | None = None
    #: This rank's writes: path -> {"size", "etag"} as S3 answered each PUT
    #: (``None``: the backend does not report them, e.g. a local folder).
    written: dict[str, dict[str, Any]] | None = None


class Snapshotter(LiveMixin, abc.ABC):
    """Frequency, naming, commit, restore choice and retention of snapshots.

    Args:
        uri: The job's snapshot folder (``s3://bucket/prefix/ns/name``).
        app_state: Name -> object with ``state_dict``/``load_state_dict``.
        every_steps: Save when ``step % every_steps == 0`` (``None``: never
            periodically).
        keep_last: Complete snapshots to keep (``None``: keep all).
        storage_options: s3fs options (endpoint, credentials) over the env.
        attempt: The gang attempt (stamped into the marker and save id).
        resume_from: Explicit snapshot URI that :meth:`restore_latest` uses
            instead of the latest complete one.
        process_group: Process group of the save (default: world).
        async_save: Write periodic snapshots in the background (needs a
            process group; without one saves are synchronous).
        watcher: The SIGTERM watcher; one is installed if ``None`` and
            ``watch_preemption`` is true.
        watch_preemption: Check the in-band preemption flag in
            :meth:`maybe_save` and take the emergency snapshot (snapshot
            requests ride the same flag: off with it).
        total_steps: The run's total steps, for the progress object.
    """

    backend: ClassVar[str] = ""
    #: Restore tries in all (finding the target, reading it), and the first
    #: backoff (doubled after each failed try): 1 + 2 + 4 s by default.
    restore_attempts: ClassVar[int] = 4
    restore_backoff_s: ClassVar[float] = 1.0
    #: Every backend class by its :attr:`backend` name, filled as the backends
    #: (``trainingjob_trainer.backends``) define them: this module never
    #: imports them.
    _by_backend: ClassVar[dict[str, type["Snapshotter"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("backend"):  # a backend's own class, not a subclass of one
            Snapshotter._by_backend[cls.backend] = cls

    @classmethod
    def for_backend(cls, name: str, **kwargs: Any) -> "Snapshotter":
        """A snapshotter of the backend called ``name``."""
        try:
            klass = Snapshotter._by_backend[name]
        except KeyError:
            raise ValueError(f"unknown snapshot backend {name!r}; expected one of {sorted(Snapshotter._by_backend)}") \
                from None
        return klass(**kwargs)

    def __init__(
        self,
        *,
        uri: str,
        app_state: Mapping[str, Any] | None = None,
        every_steps: int | None = None,
        keep_last: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        attempt: int = 0,
        resume_from: str | None = None,
        process_group: Any = None,
        async_save: bool = False,
        watcher: PreemptionWatcher | None = None,
        watch_preemption: bool = True,
        total_steps: int | None = None,
    ) -> None:
        self.total_steps = total_steps
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"every_steps must be positive, got {every_steps}")
        if keep_last is not None and keep_last <= 0:
            raise ValueError(f"keep_last must be positive, got {keep_last}")
        # Fencing (issue 11 item 4): commits, prunes and folder clearing check the S3 fence.
        self.store = SnapshotStore(uri, storage_options=storage_options,
                                   writer=Writer(int(attempt), os.environ.get(contract.ENV_JOB_UID, "")))
        self.uri = self.store.root
        self.storage_options = dict(storage_options or {})
        self.app_state = dict(app_state or {})
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.attempt = int(attempt)
        self.resume_from = resume_from or None
        self.pg = process_group
        self._flag_pg = _dist.cpu_group(process_group)
        if async_save and not _dist.initialized():
            logger.warning("async snapshots need a process group; saving synchronously")
            async_save = False
        self.async_save = async_save
        self.watcher = watcher or (PreemptionWatcher() if watch_preemption else None)
        self.restored_from: str | None = None
        self._restored_marker: contract.CommitMarker | None = None
        self.last_marker: contract.CommitMarker | None = None
        self._in_flight: _InFlight | None = None
        self.last_save_stall_s = 0.0
        #: Saves that failed and were not committed (periodic ones: training went on).
        self.failed_saves = 0
        self._writing: dict[str, dict[str, Any]] | None = None

    # ----------------------------------------------------------- backend API
    #: Whether :meth:`_write` takes ``prepare`` for an asynchronous write, i.e.
    #: empties the folder off the training thread before its first object.
    _prepares_async_writes: ClassVar[bool] = False

    @abc.abstractmethod
    def _write(
        self, uri: str, app_state: Mapping[str, Any], *, asynchronous: bool,
        prepare: Callable[[], Any] | None = None,
    ) -> PendingWrite | None:
        """Write ``app_state`` into folder ``uri`` (collective over the group).

        ``prepare`` (rank 0 only, asynchronous writes of backends that set
        :attr:`_prepares_async_writes`): must run to completion before any
        rank writes an object of this save.
        """

    @abc.abstractmethod
    def _read(self, uri: str, app_state: Mapping[str, Any]) -> None:
        """Load folder ``uri`` into ``app_state`` in place (collective)."""

    def _stored_keys(self, uri: str) -> set[str] | None:
        """Top-level app-state keys stored in ``uri`` (``None``: unknown)."""
        return None

    # --------------------------------------------------------------- restore
    def find_restore_target(self) -> str | None:
        """The snapshot to resume from: ``resume_from`` if set, else the latest complete.

        Raises:
            SnapshotNotRestorable: ``resume_from`` names an incomplete snapshot.
        """
        found = self._find_restore()
        return found[0] if found else None

    def _find_restore(self) -> tuple[str, str] | None:
        """:meth:`find_restore_target`, with the commit marker (JSON) of the folder found."""
        if self.resume_from:
            info = self.store.inspect(self.resume_from)
            if info is None or not info.complete:
                raise SnapshotNotRestorable(f"requested snapshot {self.resume_from} is not a complete snapshot")
        else:
            info = self.store.latest_complete()
            if info is None:
                return None
        assert info.marker is not None  # complete
        return info.uri, info.marker.to_json()

    def restore_latest(self, *, app_state: Mapping[str, Any] | None = None, optional: tuple[str, ...] = ()) -> int:
        """Restore the snapshot to resume from, on every rank.

        The marker read while finding it is the one restored by: no second
        look at the folder between the two (:meth:`restore` of a URI reads it).

        Returns:
            The restored global step (0 when there is nothing to restore).
        """
        found = self._restore_target_and_marker()
        if found is None:
            return 0
        return self._restore(found[0], app_state=app_state, optional=optional, marker_json=found[1]).step

    def restore_target(self) -> str | None:
        """:meth:`find_restore_target` on rank 0, retried with backoff; its
        answer, or its error, on every rank (collective)."""
        found = self._restore_target_and_marker()
        return found[0] if found else None

    def _restore_target_and_marker(self) -> tuple[str, str] | None:
        def find() -> tuple[str, str] | None:
            self.store.check_access()
            return self._find_restore()

        return self._retried(lambda: _dist.on_rank0(find, pg=self._flag_pg,
                                                    what=f"finding the snapshot to restore under {self.uri}"),
                             what=f"finding the snapshot to restore under {self.uri}")

    def _retried(self, fn: Callable[[], Any], *, what: str) -> Any:
        try:
            return _dist.with_retries(fn, attempts=self.restore_attempts, backoff_s=self.restore_backoff_s,
                                      what=what, log=logger.warning,
                                      give_up=(SnapshotNotRestorable, SnapshotConfigError))
        except SnapshotNotRestorable:
            raise
        except SnapshotConfigError as e:
            raise _storage_unusable(e) from e
        except _dist.Rank0Error as e:
            if e.cause_type == SnapshotNotRestorable.__name__:
                raise SnapshotNotRestorable(str(e)) from e
            if e.cause_type == SnapshotConfigError.__name__:
                raise _storage_unusable(SnapshotConfigError(str(e))) from e
            raise RestoreFailed(f"{what} failed after {self.restore_attempts} tries: {e}") from e
        except Exception as e:  # noqa: BLE001 - the same clear error on every rank
            raise RestoreFailed(f"{what} failed after {self.restore_attempts} tries: {type(e).__name__}: {e}") from e

    def restore(
        self,
        uri: str,
        *,
        app_state: Mapping[str, Any] | None = None,
        optional: tuple[str, ...] = (),
    ) -> contract.CommitMarker:
        """Restore one snapshot folder (must be complete) on every rank.

        Args:
            uri: The snapshot folder.
            app_state: Overrides the constructor's ``app_state``.
            optional: Keys of ``app_state`` restored only if the snapshot has
                them (TorchTNT's dataloader is saved only intra-epoch).

        Storage errors are retried (:attr:`restore_attempts`, backoff from
        :attr:`restore_backoff_s`) on every rank together, then raised on
        every rank. A SIGTERM during the restore (with a watcher) exits at once.

        Raises:
            SnapshotNotRestorable: ``uri`` is not a complete snapshot.
            PreemptedDuringRestore: SIGTERM arrived during the restore (with a
                watcher): the rank exits at once, after writing a
                ``PreemptedWithoutSnapshot`` termination message.
        """
        return self._restore(uri, app_state=app_state, optional=optional)

    def _restore(self, uri: str, *, app_state: Mapping[str, Any] | None, optional: tuple[str, ...],
                 marker_json: str | None = None) -> contract.CommitMarker:
        """:meth:`restore`; ``marker_json``: the folder's complete marker, already read on rank 0."""
        try:
            with self._exit_on_sigterm(uri):
                marker = self._retried(lambda: self._restore_once(uri, app_state=app_state, optional=optional,
                                                                  marker_json=marker_json),
                                       what=f"restore of {uri}")
        except PreemptedDuringRestore:
            logger.warning("rank %d: SIGTERM during the restore of %s; exiting at once", _dist.rank(self.pg), uri)
            parsed = contract.parse_snapshot_dir_name(uri.rstrip("/").rsplit("/", 1)[-1])
            write_termination_message(contract.TerminationMessage(
                reason=contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT,
                step=parsed[1] if parsed else None,  # the step reached: nothing ran since
                snapshot=uri.rstrip("/"),
                message=f"SIGTERM during the restore of {uri}: exited at once; no step ran since that snapshot",
            ))
            raise
        self.restored_from = uri.rstrip("/")
        self._restored_marker = marker
        return marker

    def _exit_on_sigterm(self, uri: str) -> Any:
        """While restoring ``uri``: SIGTERM raises :class:`PreemptedDuringRestore` at once."""
        if self.watcher is None:
            return contextlib.nullcontext()
        return self.watcher.raising(lambda: PreemptedDuringRestore(snapshot=uri.rstrip("/")))

    def _complete_marker_json(self, uri: str) -> str | None:
        info = self.store.inspect(uri)
        return info.marker.to_json() if info is not None and info.complete and info.marker else None

    def _restore_once(self, uri: str, *, app_state: Mapping[str, Any] | None,
                      optional: tuple[str, ...], marker_json: str | None = None) -> contract.CommitMarker:
        if marker_json is None:
            marker_json = _dist.on_rank0(lambda: self._complete_marker_json(uri), pg=self._flag_pg,
                                         what=f"reading the commit marker of {uri}")
        if marker_json is None:
            raise SnapshotNotRestorable(f"{uri} is not a complete snapshot; refusing to restore it")
        marker = contract.CommitMarker.from_json(marker_json)
        assert marker is not None
        t0 = time.monotonic()
        reader: Snapshotter = self
        if marker.backend != self.backend:  # read with the backend that wrote it
            reader = Snapshotter.for_backend(marker.backend, uri=self.uri, storage_options=self.storage_options,
                                             process_group=self.pg, watch_preemption=False)
        state = dict(app_state if app_state is not None else self.app_state)
        if optional:
            stored = reader._stored_keys(uri.rstrip("/"))
            if stored is not None:
                for key in optional:
                    if key not in stored:
                        state.pop(key, None)
        error: BaseException | None = None
        try:
            reader._read(uri.rstrip("/"), state)
        except _NOT_FAILURES:
            raise
        except BaseException as e:  # noqa: BLE001 - agreed on below, then raised on every rank
            error = e
        # 1: a storage error (retried); 2: the snapshot does not fit the state
        # (a missing key under strict, a shape mismatch: never retried). Every
        # rank takes the worst rank's branch.
        kind = 0 if error is None else 1 if isinstance(error, (OSError, TimeoutError)) else 2
        agreed = _dist.all_reduce_max([kind], pg=self._flag_pg)[0]
        if agreed:
            why = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
            failure = RuntimeError if agreed == 1 else SnapshotNotRestorable
            raise failure(f"restore of {uri} failed: {why}") from error
        if _dist.rank(self.pg) == 0:
            logger.info("restored %s (step %d) in %.2fs", uri, marker.step, time.monotonic() - t0)
        return marker

    # ------------------------------------------------------------------ save
    def step_boundary(self) -> bool:
        """The per-step check (collective): did ANY rank get SIGTERM?

        Also commits a background save that every rank has finished, with or
        without a SIGTERM watcher (without one, only while a save is in
        flight: a no-op otherwise).
        """
        if self.watcher is None and self._in_flight is None:
            return False
        return self.preemption_requested()

    def preemption_requested(self) -> bool:
        """Step-boundary check (collective): did ANY rank get SIGTERM?

        Also completes a finished background save on the way (its "all
        done" bit rides on the same all-reduce).
        """
        local = bool(self.watcher and self.watcher.local_flag)
        pending = self._in_flight is not None and self._in_flight.handle is not None
        not_done = int(pending and not self._in_flight.handle.done())  # type: ignore[union-attr]
        flag, any_not_done, self._requested = _dist.all_reduce_max(
            [int(local), not_done, self._live_request_flag()], pg=self._flag_pg)
        if pending and not any_not_done:
            self._finish_in_flight()
        return bool(flag)

    def maybe_save(
        self, step: int, *, epoch: int = 0, app_state: Mapping[str, Any] | None = None
    ) -> str | None:
        """Call once per step, after the step: saves on schedule or on preemption.

        Args:
            step: The global step just completed (1-based).
            epoch: The current epoch.
            app_state: Overrides the constructor's ``app_state``.

        Returns:
            The URI of the snapshot started, or ``None``.

        Raises:
            Preempted: After the emergency snapshot is committed (every rank).
        """
        record_progress(step)
        self._live_boundary(step=step, epoch=epoch)
        if self.step_boundary():
            self.emergency_save(step=step, epoch=epoch, app_state=app_state)
        if (self.every_steps and step % self.every_steps == 0) or self.request_due():
            uri = self.save(step=step, epoch=epoch, app_state=app_state)
            if self.hold_if_requested():
                self.emergency_save(step=step, epoch=epoch, app_state=app_state)
            return uri
        return None

    def emergency_save(
        self, *, step: int, epoch: int = 0, app_state: Mapping[str, Any] | None = None
    ) -> None:
        """Save synchronously with every rank, write the termination message, raise :class:`Preempted`.

        Raises:
            Preempted: The snapshot is committed.
            EmergencySnapshotFailed: It could not be taken (the termination
                message, ``PreemptedWithoutSnapshot``, names the error).
        """
        logger.warning("rank %d: preemption flag set, emergency snapshot at step %d", _dist.rank(self.pg), step)
        t0 = time.monotonic()
        uri = self.store.uri_for(epoch=epoch, step=step)
        try:
            self.wait()
            committed = self.last_marker is not None and (self.last_marker.step, self.last_marker.epoch) == (step, epoch)
            if not committed:
                uri = self.save(step=step, epoch=epoch, app_state=app_state, emergency=True, asynchronous=False) or uri
        except Exception as e:  # noqa: BLE001 - reported, then the job exits as preempted without snapshot
            logger.error("rank %d: emergency snapshot %s failed: %s", _dist.rank(self.pg), uri, e)
            write_termination_message(contract.TerminationMessage(
                reason=contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT, step=step,
                message=f"emergency snapshot {uri} failed: {type(e).__name__}: {e}"))
            raise EmergencySnapshotFailed(step=step) from e
        seconds = time.monotonic() - t0
        logger.warning("rank %d: emergency snapshot %s committed in %.2fs", _dist.rank(self.pg), uri, seconds)
        write_termination_message(
            contract.TerminationMessage(
                reason=contract.TERM_REASON_PREEMPTED,
                step=step,
                snapshot=uri,
                message=f"emergency snapshot at step {step} after SIGTERM",
                save_seconds=seconds,
            )
        )
        raise Preempted(step=step, snapshot=uri)

    @stall_timed
    def save(
        self,
        *,
        step: int,
        epoch: int = 0,
        app_state: Mapping[str, Any] | None = None,
        emergency: bool = False,
        asynchronous: bool | None = None,
    ) -> str | None:
        """Take a snapshot now (collective). Returns its folder URI.

        A synchronous save is committed (marker written) when this returns; an
        asynchronous one at a later step boundary or in :meth:`wait`. A failed
        periodic save is logged and counted (:attr:`failed_saves`), the
        previous snapshot stays the latest, and training goes on: ``None``.

        A save into the folder this run restored from is skipped: it holds
        this very state, complete, and re-saving it would drop its commit
        marker first, leaving nothing to restore until the save finished
        (TorchTNT's ``on_train_end`` of a restarted, finished run did that).

        Raises:
            SnapshotFailed: An emergency save failed.
        """
        self.wait()
        restored = self.restored_from
        if restored and restored.rsplit("/", 1)[0] == self.store.root \
                and contract.parse_snapshot_dir_name(restored) == (epoch, step):
            logger.info("%s is the snapshot this run restored from; not saved again", self.restored_from)
            self.last_marker = self._restored_marker or self.last_marker
            return self.restored_from
        asynchronous = self.async_save if asynchronous is None else asynchronous
        if self._requested > 1 and not emergency:  # a hold starts at the snapshot's own step
            asynchronous = False
        t0 = time.monotonic()
        # Empty the folder (a fenced attempt's leftovers): in the upload when
        # the backend can order it before the first object (two S3 round
        # trips off the training thread), else here.
        in_upload = asynchronous and self._prepares_async_writes

        def start() -> tuple[str, str]:
            save_id = new_save_id(self.attempt)
            # Never into another save's folder (issue 8 item 3, issue 11 item 4).
            name = self.store.folder_for_save(epoch=epoch, step=step, save_id=save_id)
            if not in_upload:
                self.store.begin(epoch=epoch, step=step, name=name)
            return save_id, name

        uri = self.store.uri_for(epoch=epoch, step=step)
        try:
            save_id, name = _dist.on_rank0(start, pg=self._flag_pg, what=f"preparing {uri}")
        except Exception as e:  # noqa: BLE001 - the save's failure policy
            return self._save_failed(uri, emergency=emergency, error=e)
        uri = s3.join(self.store.root, name)
        prepare = functools.partial(self.store.begin, epoch=epoch, step=step, name=name) \
            if in_upload and _dist.rank(self.pg) == 0 else None
        handle, error = None, None
        written = self._writing = {} if s3.is_s3(uri) else None
        try:
            handle = self._write(uri, app_state if app_state is not None else self.app_state,
                                 asynchronous=asynchronous, prepare=prepare)
        except _NOT_FAILURES:
            raise
        except BaseException as e:  # noqa: BLE001 - agreed on in _finish_in_flight
            error = e
        self.last_save_stall_s = time.monotonic() - t0
        self._in_flight = _InFlight(uri, epoch, step, save_id, t0, emergency, handle, error, written)
        self._live_claim(uri)
        if handle is None:
            return uri if self._finish_in_flight() is not None else None
        return uri

    @stall_timed
    def wait(self) -> contract.CommitMarker | None:
        """Finish and commit a background save, if any (collective)."""
        if self._in_flight is not None:
            return self._finish_in_flight()
        return None

    @stall_timed
    def _finish_in_flight(self) -> contract.CommitMarker | None:
        """Wait for the save in flight, agree on its outcome, commit it (collective).

        Returns:
            The new marker, or ``None`` when the (periodic) save failed.
        """
        fl = self._in_flight
        assert fl is not None
        error = fl.error
        try:
            if fl.handle is not None and error is None:
                fl.handle.wait()
        except _NOT_FAILURES:
            raise
        except BaseException as e:  # noqa: BLE001 - the save's failure policy
            error = e
        # Only now: interrupted in wait() (KeyboardInterrupt), the save stays
        # in flight, and the next save waits for it before reusing buffers.
        self._in_flight = None
        if _dist.all_reduce_max([int(error is not None)], pg=self._flag_pg)[0]:
            self._live_finished(fl.uri, None)
            return self._save_failed(fl.uri, emergency=fl.emergency,
                                     error=error or RuntimeError("another rank's write failed"))
        per_rank = _dist.all_gather_object(fl.written, pg=self._flag_pg)
        written = None if any(w is None for w in per_rank) else {k: v for w in per_rank for k, v in w.items()}
        try:
            marker_json = _dist.on_rank0(lambda: self._commit(fl, written), pg=self._flag_pg,
                                         what=f"commit of {fl.uri}")
        except Exception as e:  # noqa: BLE001 - the save's failure policy
            self._live_finished(fl.uri, None)
            return self._save_failed(fl.uri, emergency=fl.emergency, error=e)
        self._live_finished(fl.uri, marker_json)
        self.last_marker = contract.CommitMarker.from_json(marker_json)
        return self.last_marker

    def _record_write(self, path: str, size: int, etag: str) -> None:
        """Backends report each object they wrote (thread-safe: one dict item per object)."""
        if self._writing is not None:
            self._writing[path] = {"size": int(size), "etag": str(etag or "").strip('"')}

    def _commit(self, fl: _InFlight, written: dict[str, dict[str, Any]] | None) -> str:
        """Rank 0: write the marker, then prune (best effort: retried at the next save)."""
        marker = self.store.commit(epoch=fl.epoch, step=fl.step, save_id=fl.save_id, attempt=self.attempt,
                                   backend=self.backend, seconds=time.monotonic() - fl.started,
                                   emergency=fl.emergency, written=written, name=fl.uri.rsplit("/", 1)[-1])
        logger.info("committed %s (%d bytes, %.2fs)", fl.uri, marker.total_bytes, marker.seconds)
        protect = {fl.uri} | ({self.restored_from} if self.restored_from else set())
        try:
            self.store.prune(keep_last=self.keep_last, protect=protect)
        except Exception as e:  # noqa: BLE001 - retention is best effort
            logger.warning("pruning %s failed (retried after the next save): %s", self.uri, e)
        return marker.to_json()

    def _save_failed(self, uri: str, *, emergency: bool, error: BaseException) -> None:
        """A save's failure policy: an emergency save raises; a periodic one is
        logged and counted, and training goes on with the previous latest.
        Storage that refuses the job (:func:`store.config_error`, on any
        rank) ends it with :class:`SnapshotStorageUnusable`."""
        self.failed_saves += 1
        cfg = config_error(error)
        if _dist.all_reduce_max([int(cfg is not None)], pg=self._flag_pg)[0]:
            raise _storage_unusable(cfg or SnapshotConfigError(f"snapshot {uri}: S3 refused another rank"))
        if emergency:
            raise SnapshotFailed(f"snapshot {uri} failed: {type(error).__name__}: {error}") from error
        latest = self.last_marker
        logger.error("rank %d: snapshot %s failed and is not committed (%d failed so far; training goes on, "
                     "the latest snapshot is still %s): %s: %s", _dist.rank(self.pg), uri, self.failed_saves,
                     self.store.uri_for(epoch=latest.epoch, step=latest.step) if latest else "none",
                     type(error).__name__, error)
        return None

    def close(self) -> None:
        """Commit any background save, uninstall the SIGTERM handler and free
        the buffers kept between saves."""
        try:
            self.wait()
            if self.watcher is not None:
                self.watcher.uninstall()
        finally:
            self._live_close(flush=True)
            self._free_kept_buffers()

    def abandon(self) -> None:
        """After an error on this rank: local cleanup only, no collective.

        The other ranks may be anywhere (in a step's all-reduce, in a
        collective of their own error handling, gone), so a collective here
        would pair with one of theirs or hang until the group's timeout. A
        save in flight is not committed: its folder keeps no marker, is never
        restored, and is cleared by the next save of that step or by
        retention. The SIGTERM handler is uninstalled (a SIGTERM now ends the
        process) and kept staging buffers are dropped; an upload still
        running keeps its own references to its buffers.
        """
        fl, self._in_flight = self._in_flight, None
        if fl is not None:
            logger.warning("rank %d: not committing snapshot %s after an error", _dist.rank(self.pg), fl.uri)
        if self.watcher is not None:
            self.watcher.uninstall()
        self._live_close(flush=False)
        self._free_kept_buffers()

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """:meth:`close` after a clean exit; :meth:`abandon` after an exception
        (:class:`Preempted` included: its snapshot is committed already)."""
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def _free_kept_buffers(self) -> None:
        """Backends that keep staging buffers between saves free them here."""


def record_progress(step: int) -> None:
    """Local rank 0 notes the step just completed for the launcher (a few µs)."""
    path = os.environ.get(contract.ENV_PROGRESS_FILE)
    if not path or _dist.local_rank() != 0:
        return
    try:
        with open(path, "w") as f:
            f.write(str(int(step)))
    except OSError:
        pass


def env_int(name: str, default: int | None = None) -> int | None:
    """An integer from the environment (``default`` when unset or empty)."""
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default
