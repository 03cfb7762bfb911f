"""Live progress and snapshots on request (issue 12), the trainer's side.

Rank 0 of the snapshot's process group runs one daemon thread, ``tj-live``
(:class:`LiveChannel`), that

* writes the progress object (:class:`contract.Progress`) at most every
  ``TJ_PROGRESS_SECONDS``;
* GETs the snapshot-request object every ``TJ_CONTROL_POLL_SECONDS`` and, for
  a value not yet served (the acknowledgement in S3 says which one was, so a
  restarted trainer does not serve it twice), raises a local "request" flag;
* writes the acknowledgement once the snapshot that served it is committed.

The training thread only appends to in-memory state under a lock (a few µs
per step); every S3 call happens on ``tj-live``, and an S3 error there is
logged and retried at the next period, never raised into training.

The request flag reaches every rank on the step-boundary all-reduce that
already carries the preemption flag (one more integer in the same vector,
:meth:`trainingjob_trainer.snapshotter.Snapshotter.preemption_requested`).
:class:`LiveMixin` is the snapshotter's side: it owns the channel, times the
snapshot stalls and decides, identically on every rank, when the request is
served.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TypeVar

from trainingjob_trainer import _dist, contract, s3

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


#: Seconds between two all-reduces while holding (far below any group timeout).
HOLD_POLL_SECONDS = 0.25
HOLD_RELEASED = 1
HOLD_TIMED_OUT = 2


def utc_now() -> str:
    """The current time as RFC 3339 UTC with milliseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (``default`` when unset, empty or invalid)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        logger.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    return value if value > 0 else default


class StepRate:
    """Steps per second over the step boundaries of the last ``window`` seconds (pure).

    Args:
        window: Seconds of history the rate is measured over.
    """

    def __init__(self, *, window: float) -> None:
        self.window = float(window)
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, *, now: float, step: int) -> None:
        """Record that ``step`` completed at monotonic time ``now``."""
        self._samples.append((now, step))
        # Keep one sample at or before the window's start, so the window is full.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> tuple[float | None, float]:
        """``(steps per second or None, seconds measured over)``."""
        if len(self._samples) < 2:
            return None, 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return None, 0.0
        return (s1 - s0) / (t1 - t0), t1 - t0


class LiveChannel:
    """Rank 0's progress writer and snapshot-request poller (one daemon thread).

    Args:
        root: The job's snapshot folder.
        storage_options: s3fs options over the contract env.
        attempt: The gang attempt.
        progress_seconds: Minimum seconds between two progress writes.
        poll_seconds: Seconds between two GETs of the request object.
        window_seconds: The steps/s window.
    """

    def __init__(
        self,
        *,
        root: str,
        storage_options: Mapping[str, Any] | None,
        attempt: int,
        progress_seconds: float,
        poll_seconds: float,
        window_seconds: float = contract.PROGRESS_WINDOW_SECONDS,
    ) -> None:
        self.root = root.rstrip("/")
        self._storage_options = dict(storage_options or {})
        self.attempt = attempt
        self.progress_seconds = progress_seconds
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._rate = StepRate(window=window_seconds)
        self._started = time.monotonic()
        self._step: int | None = None
        self._epoch = 0
        self._start_step = 0
        self._first_step_at: str | None = None
        self._stalled = 0.0
        self.total_steps: int | None = None
        self._served: str | None = None  # the value the latest ack names
        self._ack_read = False
        self._pending: str | None = None
        self._pending_hold = 0  # the pending request's hold_seconds
        self._latest: contract.SnapshotRequest | None = None  # the request object as last read
        self._hold_deadline: float | None = None
        self._claims: dict[str, str] = {}  # snapshot URI -> request value it serves
        self._acks: list[contract.SnapshotAck] = []
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.progress_writes = 0  # successful writes (for tests and logs)
        self.polls = 0  # successful request GETs
        self._thread = threading.Thread(target=self._run, name="tj-live", daemon=True)
        self._thread.start()

    # ------------------------------------------------- training thread side
    def on_step(self, *, step: int, epoch: int, stalled: float) -> None:
        """Record a step boundary (no I/O)."""
        with self._lock:
            if self._step is None:
                self._start_step = max(0, step - 1)
                self._first_step_at = utc_now()
            self._step, self._epoch, self._stalled = step, epoch, stalled
            self._rate.add(now=time.monotonic(), step=step)

    def set_stalled(self, stalled: float) -> None:
        """Update the stalled seconds without a step boundary (no I/O)."""
        with self._lock:
            self._stalled = stalled

    def request_pending(self) -> bool:
        """Whether a request not yet served or being served is waiting."""
        return self._pending is not None

    def request_flag(self) -> int:
        """The flag-vector entry: 0 none, else 1 + the waiting request's hold seconds."""
        with self._lock:
            return 0 if self._pending is None else 1 + self._pending_hold

    def start_hold(self, seconds: int) -> None:
        """A hold of at most ``seconds`` starts now (for the request last served)."""
        self._hold_deadline = time.monotonic() + seconds

    def hold_release(self) -> int:
        """Why the hold ends: 0 it goes on, 1 the request object now holds a
        value without a hold, 2 its seconds passed (a false alarm)."""
        with self._lock:
            latest = self._latest
        if latest is not None and latest.value != self._served and not latest.hold_seconds:
            return HOLD_RELEASED
        if self._hold_deadline is not None and time.monotonic() >= self._hold_deadline:
            return HOLD_TIMED_OUT
        return 0

    def claim(self, uri: str) -> None:
        """The snapshot ``uri`` just started serves the waiting request, if any."""
        with self._lock:
            if self._pending is not None:
                self._claims[uri] = self._pending
                self._pending = None

    def finished(self, uri: str, marker: contract.CommitMarker | None) -> None:
        """Snapshot ``uri`` was committed (``marker``) or failed (``None``)."""
        with self._lock:
            value = self._claims.pop(uri, None)
            if value is None:
                return
            if marker is None:  # not served: the next poll raises it again
                return
            self._served = value
            self._acks.append(contract.SnapshotAck(value=value, step=marker.step, completed_at=utc_now(),
                                                   snapshot=uri, attempt=self.attempt))
        self._dirty.set()

    def close(self, *, flush_timeout: float | None) -> None:
        """Stop the thread; with ``flush_timeout``, write the last progress and acks first (bounded wait)."""
        self._stop.set()
        self._dirty.set()
        if flush_timeout is not None:
            self._thread.join(flush_timeout)

    # ------------------------------------------------------ tj-live thread
    def progress(self) -> contract.Progress | None:
        """The progress object as of now (``None`` before the first step)."""
        with self._lock:
            if self._step is None:
                return None
            rate, window = self._rate.rate()
            return contract.Progress(
                attempt=self.attempt, step=self._step, epoch=self._epoch, start_step=self._start_step,
                total_steps=self.total_steps, wall_seconds=round(time.monotonic() - self._started, 3),
                steps_per_second=None if rate is None else round(rate, 6), window_seconds=round(window, 3),
                stalled_seconds=round(self._stalled, 3), first_step_at=self._first_step_at, updated_at=utc_now(),
            )

    def _path(self, rel: str) -> tuple[Any, str]:
        fs, path = s3.filesystem(contract.live_object_uri(self.root, rel), self._storage_options)
        return fs, path

    def _put(self, rel: str, text: str) -> None:
        fs, path = self._path(rel)
        fs.pipe_file(path, text.encode())

    def _get(self, rel: str) -> bytes | None:
        fs, path = self._path(rel)
        try:
            return s3.cat_small(fs, path)
        except FileNotFoundError:
            return None

    def _poll(self) -> None:
        if not self._ack_read:
            ack = contract.SnapshotAck.from_json(self._get(contract.SNAPSHOT_ACK_OBJECT))
            with self._lock:
                self._served = self._served or (ack.value if ack else None)
            self._ack_read = True
        request = contract.SnapshotRequest.from_json(self._get(contract.SNAPSHOT_REQUEST_OBJECT))
        self.polls += 1
        with self._lock:
            self._latest = request
            if request is None or request.value == self._served or request.value in self._claims.values():
                return
            if request.value != self._pending:
                logger.info("snapshot requested (%r): taken at the next step boundary", request.value)
            self._pending, self._pending_hold = request.value, request.hold_seconds

    def _write_progress(self) -> None:
        p = self.progress()
        if p is not None:
            self._put(contract.PROGRESS_OBJECT, p.to_json())
            self.progress_writes += 1

    def _write_acks(self) -> None:
        while True:
            with self._lock:
                if not self._acks:
                    return
                ack = self._acks[0]
            self._put(contract.SNAPSHOT_ACK_OBJECT, ack.to_json())
            logger.info("snapshot request %r served by %s (step %d)", ack.value, ack.snapshot, ack.step)
            with self._lock:
                self._acks.pop(0)

    def _attempt(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - never into training; retried next period
            logger.warning("tj-live: %s failed (%s: %s); retrying next period", what, type(e).__name__, e)

    def _run(self) -> None:
        next_poll = next_progress = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            self._attempt("acknowledging a snapshot request", self._write_acks)
            if now >= next_poll and not stopping:
                self._attempt("reading the snapshot request", self._poll)
                next_poll = now + self.poll_seconds
            if time.monotonic() >= next_progress or stopping:
                next_progress = time.monotonic() + self.progress_seconds  # from this write's start
                self._attempt("writing progress", self._write_progress)
            if stopping:
                return
            self._dirty.wait(max(0.0, min(next_poll, next_progress) - time.monotonic()))
            self._dirty.clear()


def stall_timed(method: _F) -> _F:
    """Decorate a :class:`LiveMixin` method: its wall time adds to ``stalled_seconds``
    (nested timed calls count once)."""

    @functools.wraps(method)
    def wrapper(self: "LiveMixin", *args: Any, **kwargs: Any) -> Any:
        if self._stall_depth:
            return method(self, *args, **kwargs)
        self._stall_depth = 1
        t0 = time.monotonic()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._stall_depth = 0
            self.stalled_seconds += time.monotonic() - t0

    return wrapper  # type: ignore[return-value]


class LiveMixin:
    """The snapshotter's side of progress and requests (see the module doc).

    Expects ``uri``, ``storage_options``, ``attempt``, ``pg`` and
    ``_in_flight`` from :class:`~trainingjob_trainer.snapshotter.Snapshotter`.
    The channel starts at the first step boundary, so snapshotters that only
    restore or inspect (probes, readers) start no thread.
    """

    stalled_seconds: float = 0.0
    held_seconds: float = 0.0  # idle in holds that ended without a kill
    total_steps: int | None = None
    _stall_depth: int = 0
    _live: LiveChannel | None = None
    _live_started: bool = False
    _requested: int = 0  # the agreed flag: 0 none, else 1 + hold seconds
    _hold_uri: tuple[str, int] | None = None  # the save serving a hold request, its seconds
    _hold_armed: tuple[int, int] | None = None  # committed: (step, seconds) to hold at

    def _live_boundary(self, *, step: int, epoch: int) -> None:
        """At every step boundary, before the flag all-reduce."""
        if not self._live_started:
            self._live_started = True
            if _dist.rank(self.pg) == 0:  # type: ignore[attr-defined]
                self._live = LiveChannel(
                    root=self.uri, storage_options=self.storage_options, attempt=self.attempt,  # type: ignore[attr-defined]
                    progress_seconds=env_seconds(contract.ENV_PROGRESS_SECONDS, contract.DEFAULT_PROGRESS_SECONDS),
                    poll_seconds=env_seconds(contract.ENV_CONTROL_POLL_SECONDS, contract.DEFAULT_CONTROL_POLL_SECONDS),
                )
        if self._live is not None:
            self._live.total_steps = self.total_steps
            self._live.on_step(step=step, epoch=epoch, stalled=self.stalled_seconds)

    def _live_request_flag(self) -> int:
        """This rank's entry in the flag vector: 1 while rank 0 holds an unserved request."""
        return self._live.request_flag() if self._live is not None else 0

    def request_due(self) -> bool:
        """Whether to take a snapshot now for a request (same answer on every rank).

        True after a boundary's all-reduce carried a request, once no save
        is in flight (a request arriving during a save is served after it).
        """
        return bool(self._requested) and self._in_flight is None  # type: ignore[attr-defined]

    def _live_claim(self, uri: str) -> None:
        """A save into ``uri`` started: it serves the waiting request (all ranks)."""
        self._hold_uri = (uri, self._requested - 1) if self._requested > 1 else None
        self._requested = 0
        if self._live is not None:
            self._live.claim(uri)

    def _live_finished(self, uri: str, marker_json: str | None) -> None:
        """The save into ``uri`` was committed (its marker) or failed (``None``)."""
        marker = contract.CommitMarker.from_json(marker_json) if marker_json else None
        if self._hold_uri is not None and self._hold_uri[0] == uri:
            self._hold_armed = (marker.step, self._hold_uri[1]) if marker is not None else None
            self._hold_uri = None
        if self._live is not None:
            self._live.finished(uri, marker)

    def hold_if_requested(self) -> bool:
        """After a committed save that served a request with a hold: every rank
        waits at this step boundary (collective; same answer on every rank).

        The wait is a short all-reduce every :data:`HOLD_POLL_SECONDS` (never
        one long collective: gloo would time out), carrying this rank's
        SIGTERM flag and rank 0's release (see :meth:`LiveChannel.hold_release`).
        A kill during the hold loses no step past the snapshot.

        Returns:
            True when SIGTERM came during the hold: the caller takes the
            emergency path (its save is skipped, the snapshot at this step is
            committed already). False: no hold, or released (training goes on).
        """
        armed, self._hold_armed = self._hold_armed, None
        if armed is None:
            return False
        step, seconds = armed
        if self._live is not None:
            self._live.start_hold(seconds)
        rank = _dist.rank(self.pg)  # type: ignore[attr-defined]
        logger.warning("rank %d: snapshot at step %d committed; holding (at most %ds) for the reclaim",
                       rank, step, seconds)
        t0 = time.monotonic()
        while True:
            watcher = self.watcher  # type: ignore[attr-defined]
            local = int(bool(watcher and watcher.local_flag))
            release = self._live.hold_release() if self._live is not None else 0
            sigterm, release = _dist.all_reduce_max([local, release], pg=self._flag_pg)  # type: ignore[attr-defined]
            if sigterm:
                logger.warning("rank %d: SIGTERM during the hold at step %d", rank, step)
                return True
            if release:
                why = "the request was replaced" if release == HOLD_RELEASED else \
                    f"no kill within {seconds}s: a false alarm"
                logger.warning("rank %d: hold at step %d ended after %.1fs (%s); training resumes",
                               rank, step, time.monotonic() - t0, why)
                self.held_seconds += time.monotonic() - t0
                return False
            time.sleep(HOLD_POLL_SECONDS)

    def _live_close(self, *, flush: bool) -> None:
        """Stop the channel; after a clean end, write the last progress (at most 10 s)."""
        live, self._live = self._live, None
        if live is not None:
            live.set_stalled(self.stalled_seconds)  # the final save's stall too
            live.close(flush_timeout=10.0 if flush else None)


def tnt_total_steps(*, max_steps: int | None, max_epochs: int | None, max_steps_per_epoch: int | None,
                    dataloader: Any) -> int | None:
    """A TorchTNT run's total train steps, where its loop conditions say (``None``: unknown).

    ``max_steps`` wins; else ``max_epochs`` x steps per epoch, the latter from
    ``max_steps_per_epoch`` or the smaller of it and ``len(dataloader)``.
    """
    per_epoch = max_steps_per_epoch
    try:
        n = len(dataloader)
        per_epoch = n if per_epoch is None else min(per_epoch, n)
    except TypeError:
        pass
    by_epochs = max_epochs * per_epoch if max_epochs is not None and per_epoch is not None else None
    if max_steps is not None and by_epochs is not None:
        return min(max_steps, by_epochs)
    return max_steps if max_steps is not None else by_epochs
