"""The plain-loop snapshot API and the base class every backend shares.

:class:`Snapshotter` owns everything that is not backend I/O: frequency,
folder naming (``epoch_{e}_train_step_{s}``), the commit marker, the choice
of the snapshot to restore, retention, async completion and the coordinated
emergency snapshot. A backend implements :meth:`Snapshotter._write` and
:meth:`Snapshotter._read` (see :mod:`trainingjob_trainer.backends`).

Typical use in a plain PyTorch loop::

    snap = snapshotter_from_env(app_state={"train": ModelOptimizerState(model=m, optimizers=[opt])})
    start = snap.restore_latest()            # 0 on a fresh job
    for step in range(start + 1, total + 1):
        train_step(step)
        snap.maybe_save(step)                # may raise Preempted (exit code 83)
    snap.close()
"""

from __future__ import annotations

import abc
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from trainingjob_trainer import _dist, contract
from trainingjob_trainer.preemption import Preempted, PreemptionWatcher, write_termination_message
from trainingjob_trainer.store import SnapshotStore, new_save_id

logger = logging.getLogger(__name__)


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


class Snapshotter(abc.ABC):
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
            :meth:`maybe_save` and take the emergency snapshot.
    """

    backend: ClassVar[str] = ""

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
    ) -> None:
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"every_steps must be positive, got {every_steps}")
        if keep_last is not None and keep_last <= 0:
            raise ValueError(f"keep_last must be positive, got {keep_last}")
        self.store = SnapshotStore(uri, storage_options=storage_options)
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
        self.last_marker: contract.CommitMarker | None = None
        self._in_flight: _InFlight | None = None
        self.last_save_stall_s = 0.0

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
            RuntimeError: ``resume_from`` names an incomplete snapshot.
        """
        if self.resume_from:
            info = self.store.inspect(self.resume_from)
            if info is None or not info.complete:
                raise RuntimeError(f"requested snapshot {self.resume_from} is not a complete snapshot")
            return info.uri
        info = self.store.latest_complete()
        return info.uri if info else None

    def restore_latest(self, *, app_state: Mapping[str, Any] | None = None, optional: tuple[str, ...] = ()) -> int:
        """Restore the snapshot to resume from, on every rank.

        Returns:
            The restored global step (0 when there is nothing to restore).
        """
        target = None
        if _dist.rank(self.pg) == 0:
            try:
                target = ("ok", self.find_restore_target())
            except Exception as e:  # noqa: BLE001 - every rank must learn it
                target = ("error", str(e))
        target = _dist.broadcast_object(target, pg=self._flag_pg)
        if target[0] == "error":
            raise RuntimeError(target[1])
        if target[1] is None:
            return 0
        return self.restore(target[1], app_state=app_state, optional=optional).step

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
        """
        marker_json = None
        if _dist.rank(self.pg) == 0:
            info = self.store.inspect(uri)
            marker_json = info.marker.to_json() if info is not None and info.complete and info.marker else None
        marker_json = _dist.broadcast_object(marker_json, pg=self._flag_pg)
        if marker_json is None:
            raise RuntimeError(f"{uri} is not a complete snapshot; refusing to restore it")
        marker = contract.CommitMarker.from_json(marker_json)
        assert marker is not None
        t0 = time.monotonic()
        reader: Snapshotter = self
        if marker.backend != self.backend:  # read with the backend that wrote it
            from trainingjob_trainer.backends import make_snapshotter

            reader = make_snapshotter(backend=marker.backend, uri=self.uri, storage_options=self.storage_options,
                                      process_group=self.pg, watch_preemption=False)
        state = dict(app_state if app_state is not None else self.app_state)
        if optional:
            stored = reader._stored_keys(uri.rstrip("/"))
            if stored is not None:
                for key in optional:
                    if key not in stored:
                        state.pop(key, None)
        reader._read(uri.rstrip("/"), state)
        _dist.barrier(self._flag_pg)
        self.restored_from = uri.rstrip("/")
        if _dist.rank(self.pg) == 0:
            logger.info("restored %s (step %d) in %.2fs", uri, marker.step, time.monotonic() - t0)
        return marker

    # ------------------------------------------------------------------ save
    def preemption_requested(self) -> bool:
        """Step-boundary check (collective): did ANY rank get SIGTERM?

        Also completes a finished background save on the way (its "all
        done" bit rides on the same all-reduce).
        """
        local = bool(self.watcher and self.watcher.local_flag)
        pending = self._in_flight is not None and self._in_flight.handle is not None
        not_done = int(pending and not self._in_flight.handle.done())  # type: ignore[union-attr]
        flag, any_not_done = _dist.all_reduce_max([int(local), not_done], pg=self._flag_pg)
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
        if self.watcher is not None and self.preemption_requested():
            self.emergency_save(step=step, epoch=epoch, app_state=app_state)
        if self.every_steps and step % self.every_steps == 0:
            return self.save(step=step, epoch=epoch, app_state=app_state)
        return None

    def emergency_save(
        self, *, step: int, epoch: int = 0, app_state: Mapping[str, Any] | None = None
    ) -> None:
        """Save synchronously with every rank, write the termination message, raise :class:`Preempted`."""
        logger.warning("rank %d: preemption flag set, emergency snapshot at step %d", _dist.rank(self.pg), step)
        t0 = time.monotonic()
        self.wait()
        uri = self.store.uri_for(epoch=epoch, step=step)
        committed = self.last_marker is not None and (self.last_marker.step, self.last_marker.epoch) == (step, epoch)
        if not committed:
            uri = self.save(step=step, epoch=epoch, app_state=app_state, emergency=True, asynchronous=False)
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

    def save(
        self,
        *,
        step: int,
        epoch: int = 0,
        app_state: Mapping[str, Any] | None = None,
        emergency: bool = False,
        asynchronous: bool | None = None,
    ) -> str:
        """Take a snapshot now (collective). Returns its folder URI.

        A synchronous save is committed (marker written) when this returns; an
        asynchronous one at a later step boundary or in :meth:`wait`.
        """
        self.wait()
        asynchronous = self.async_save if asynchronous is None else asynchronous
        save_id = None
        prepare = None
        t0 = time.monotonic()
        if _dist.rank(self.pg) == 0:
            save_id = new_save_id(self.attempt)
            # Empty the folder (a fenced attempt's leftovers): in the upload
            # when the backend can order it before the first object (two S3
            # round trips off the training thread), else here.
            prepare = functools.partial(self.store.begin, epoch=epoch, step=step)
            if not (asynchronous and self._prepares_async_writes):
                prepare()
                prepare = None
        save_id = _dist.broadcast_object(save_id, pg=self._flag_pg)
        uri = self.store.uri_for(epoch=epoch, step=step)
        handle = self._write(uri, app_state if app_state is not None else self.app_state, asynchronous=asynchronous,
                             prepare=prepare)
        self.last_save_stall_s = time.monotonic() - t0
        self._in_flight = _InFlight(uri, epoch, step, save_id, t0, emergency, handle)
        if handle is None:
            self._finish_in_flight()
        return uri

    def wait(self) -> contract.CommitMarker | None:
        """Finish and commit a background save, if any (collective)."""
        if self._in_flight is not None:
            return self._finish_in_flight()
        return None

    def _finish_in_flight(self) -> contract.CommitMarker | None:
        fl = self._in_flight
        assert fl is not None
        ok = True
        try:
            if fl.handle is not None:
                fl.handle.wait()
        except Exception:  # noqa: BLE001
            logger.exception("snapshot write to %s failed; it will not be committed", fl.uri)
            ok = False
        # Only now: interrupted in wait() (KeyboardInterrupt), the save stays
        # in flight, and the next save waits for it before reusing buffers.
        self._in_flight = None
        ok = not _dist.all_reduce_max([int(not ok)], pg=self._flag_pg)[0]
        marker_json = None
        if ok and _dist.rank(self.pg) == 0:
            marker = self.store.commit(
                epoch=fl.epoch,
                step=fl.step,
                save_id=fl.save_id,
                attempt=self.attempt,
                backend=self.backend,
                seconds=time.monotonic() - fl.started,
                emergency=fl.emergency,
            )
            marker_json = marker.to_json()
            logger.info("committed %s (%d bytes, %.2fs)", fl.uri, marker.total_bytes, marker.seconds)
            protect = {fl.uri} | ({self.restored_from} if self.restored_from else set())
            self.store.prune(keep_last=self.keep_last, protect=protect)
        marker_json = _dist.broadcast_object(marker_json, pg=self._flag_pg)
        if not ok or marker_json is None:
            raise RuntimeError(f"snapshot {fl.uri} failed")
        self.last_marker = contract.CommitMarker.from_json(marker_json)
        return self.last_marker

    def close(self) -> None:
        """Commit any background save, uninstall the SIGTERM handler and free
        the buffers kept between saves."""
        try:
            self.wait()
            if self.watcher is not None:
                self.watcher.uninstall()
        finally:
            self._free_kept_buffers()

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
