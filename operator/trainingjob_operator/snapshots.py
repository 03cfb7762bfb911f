"""Snapshot status from S3, the single source of truth.

The operator lists the job's folder ``<spec.snapshot.uri>/<ns>/<name>/`` with
s3fs and the job's credentials Secret, applies the contract's completion rule
(:func:`trainingjob_trainer.contract.snapshot_is_complete`) to each snapshot
folder and reports the newest complete one. Credentials are used for the
S3 client only: they are never logged, and errors are reported by type and
message of the S3 error, which contain no secret.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from trainingjob_trainer import contract

from .classify import parse_time
from .model import JobSpec
from .progress_status import MAX_PROGRESS_BYTES
from .reconcile import SnapshotState
from .snapshot_requests import LiveCache

if TYPE_CHECKING:
    from trainingjob_trainer.store import MarkerCache, SnapshotStore

log = logging.getLogger(__name__)

#: Listings run in threads of their own (blocking s3fs calls; mostly waiting on S3): 50 preempted jobs
#: each want a fresh listing before their new gang, and the loop's default pool has cpu + 4 threads.
_LISTING_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="s3-listing")


@dataclass(frozen=True)
class S3Access:
    endpoint: str | None
    region: str | None
    key: str | None = None
    secret: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print credentials
        return f"S3Access(endpoint={self.endpoint!r}, region={self.region!r}, key={'***' if self.key else None})"

    def secret_values(self) -> tuple[str, ...]:
        """The credential values, to mask them in anything the operator writes."""
        return tuple(v for v in (self.key, self.secret, self.token) if v and len(v) >= 4)

    def storage_options(self) -> dict[str, Any]:
        # A status read must not stall the job's reconcile for long: short
        # timeouts, few retries (the next reconcile tries again anyway).
        opts: dict[str, Any] = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 10,
                                                  "retries": {"max_attempts": 2, "mode": "standard"}}}
        if self.endpoint:
            opts["endpoint_url"] = self.endpoint
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        if self.key:
            opts.update(key=self.key, secret=self.secret)
            if self.token:
                opts["token"] = self.token
        elif self.endpoint:
            # No credentialsSecret and an endpoint chosen by the job's author:
            # read anonymously, never sending the operator's own credentials
            # there. (Without an endpoint, AWS S3 itself is read with the
            # operator's ambient identity, e.g. IRSA, as the pods do.)
            opts["anon"] = True
        return opts


def read_progress(store: SnapshotStore, live: Mapping[str, Mapping[str, Any]],
                  seen: tuple[str | None, contract.Progress | None]) -> tuple[str | None, contract.Progress | None]:
    """The trainer's progress object, from the listing's ``_tj/`` entries (blocking).

    One GET only when the listing shows an ETag other than the one read last
    (``seen``: ``(etag, parsed)``); none when it is unchanged, absent or larger
    than :data:`~.progress_status.MAX_PROGRESS_BYTES`. A GET that fails
    returns ``seen`` (the next pass tries again: the ETag still differs) and
    never fails the listing; a malformed object reads as ``None``.
    """
    from trainingjob_trainer import s3

    meta = live.get(contract.PROGRESS_OBJECT)
    if meta is None or int(meta.get("size") or 0) > MAX_PROGRESS_BYTES:
        return None, None
    etag = str(meta.get("etag") or "") or None
    if etag is not None and etag == seen[0]:
        return seen
    _, path = s3.filesystem(contract.live_object_uri(store.root, contract.PROGRESS_OBJECT), store.storage_options)
    try:
        text = s3.cat_small(store.fs, path)
    except FileNotFoundError:  # deleted between the listing and the GET
        return None, None
    except Exception as e:  # best effort: the snapshot state stands; the changed ETag is retried next pass
        log.warning("reading %s failed: %s: %s", contract.PROGRESS_OBJECT, type(e).__name__, str(e)[:200])
        return seen
    return etag, contract.Progress.from_json(text)


def read_snapshot_state(root_uri: str, access: S3Access,
                        seen: tuple[str | None, contract.Progress | None] = (None, None), *,
                        live_cache: LiveCache | None = None, marker_cache: MarkerCache | None = None) -> SnapshotState:
    """List ``root_uri`` and apply the completion rule to every snapshot folder (blocking).

    Uses the trainer's :class:`~trainingjob_trainer.store.SnapshotStore` (no
    torch): the operator and the pods apply the very same rule to the very
    same listing. The same listing finds the trainer's progress object
    (:func:`read_progress`; ``seen``: the ETag and content read last) and,
    with ``live_cache``, the snapshot-request and ack objects (a GET only
    when one changed). With ``marker_cache`` a commit marker is read only when
    the listing shows an ETag not read before.
    """
    from trainingjob_trainer.store import SnapshotStore

    store = SnapshotStore(root_uri, storage_options=access.storage_options(), marker_cache=marker_cache)
    infos, entries = store.scan_with_live()
    etag, progress = read_progress(store, entries, seen)
    live = live_cache.read(store.fs, store._root_path, entries) if live_cache is not None else None
    complete = [i for i in infos if i.complete and i.marker is not None]
    if not complete:
        return SnapshotState(latest=None, count=0, progress=progress, progress_etag=etag, live=live)
    newest = complete[-1]  # scan() orders by parsed (step, epoch)
    m = newest.marker
    assert m is not None
    interval = None
    if len(complete) >= 2 and complete[-2].marker is not None:
        a, b = parse_time(complete[-2].marker.saved_at), parse_time(m.saved_at)
        if a and b and b > a:
            interval = (b - a).total_seconds()
    latest = {"uri": newest.uri, "epoch": m.epoch, "step": m.step, "savedAt": m.saved_at, "bytes": m.total_bytes,
              "seconds": round(float(m.seconds), 3), "emergency": bool(m.emergency)}
    return SnapshotState(latest=latest, count=len(complete), interval_seconds=interval, latest_attempt=m.attempt,
                         progress=progress, progress_etag=etag, live=live)


def access_from_secret(spec: JobSpec, secret: Mapping[str, Any] | None) -> tuple[S3Access | None, str | None]:
    """S3 access for the job, or ``(None, problem)`` with a message a user can act on."""
    snap = spec.snapshot
    assert snap is not None
    if not snap.credentials_secret:
        return S3Access(endpoint=snap.endpoint, region=snap.region), None
    if secret is None:
        return None, (f"credentials Secret {snap.credentials_secret!r} not found in the job's namespace; create it "
                      f"with keys {', '.join(contract.SECRET_KEYS_REQUIRED)}")
    data = secret.get("data") or {}
    missing = [k for k in contract.SECRET_KEYS_REQUIRED if k not in data]
    if missing:
        return None, f"credentials Secret {snap.credentials_secret!r} lacks key(s) {', '.join(missing)}"
    try:
        values = {k: base64.b64decode(v).decode() for k, v in data.items()
                  if k in contract.SECRET_KEYS_REQUIRED + contract.SECRET_KEYS_OPTIONAL}
    except (ValueError, UnicodeDecodeError):
        return None, f"credentials Secret {snap.credentials_secret!r} has values that are not valid base64 text"
    return S3Access(
        endpoint=snap.endpoint, region=snap.region,
        key=values[contract.SECRET_KEY_ACCESS_KEY_ID], secret=values[contract.SECRET_KEY_SECRET_ACCESS_KEY],
        token=values.get(contract.SECRET_KEY_SESSION_TOKEN),
    ), None


class SnapshotReader:
    """Reads each job's snapshot state from S3, cached per job.

    How long a listing is reused (issue 10: a listing is one LIST plus one
    GET of the fence, plus a GET per snapshot folder whose marker it has not
    read under that ETag before, so it is the operator's main S3 cost):

    * while the job has a gang (``steady``): the job's expected snapshot
      interval (the time between its two newest snapshots), at least
      ``steady_interval`` and at most ``max_interval``: about one listing per
      snapshot the job writes, and a preemption's fencing never waits for S3;
      a job that sets ``spec.snapshot.progressSeconds`` is listed once per
      that period instead (its status' progress is that fresh);
    * otherwise ``min_interval`` (a few seconds). The listings that decide
      something are forced fresh by the caller: before a gang is created (it
      resumes from the newest snapshot, perhaps the emergency one its
      predecessor just committed) and when a job ends (its final status);
    * Suspended: ``finished_interval``. (Succeeded and Failed jobs are not
      listed at all: the operator does not ask, see ``handlers.Controller``.)

    A cached listing is dropped when what it describes may have changed: a new
    attempt, a spec change (``metadata.generation``), other credentials,
    ``force`` (before a gang is created), or :meth:`invalidate` (an on-demand
    snapshot request). A listing never holds a reconcile for more than
    ``timeout`` seconds: a slow or unreachable endpoint (chosen by the job's
    author) leaves the listing running in its thread, the reconcile goes on
    with the last known state, and no second listing of that job starts until
    it ends.
    """

    def __init__(self, *, min_interval: float = 3.0, steady_interval: float = 60.0, max_interval: float = 600.0,
                 finished_interval: float = 60.0, timeout: float = 8.0) -> None:
        self.min_interval = min_interval
        self.steady_interval = steady_interval
        self.max_interval = max_interval
        self.finished_interval = finished_interval
        self.timeout = timeout
        self._cache: dict[tuple[str, str], tuple[float, Any, SnapshotState]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[SnapshotState]] = {}
        self.live_cache = LiveCache()
        from trainingjob_trainer.store import MarkerCache

        #: Every job's commit markers, by ETag: a steady listing is a LIST and the fence, not a GET per folder.
        self.marker_cache = MarkerCache()

    def reuse_for(self, *, phase: str | None, steady: bool, state: SnapshotState,
                  progress_seconds: float | None = None) -> float:
        """Seconds a listing in ``state`` may be reused for a job in ``phase``.

        ``progress_seconds``: the job's explicit ``spec.snapshot.progressSeconds``.
        A job that sets it asks for its status' progress that fresh, and pays
        one listing per period (at most one per ``min_interval``); without it
        progress is as fresh as the steady listing (docs/architecture.md).
        """
        if phase in ("Succeeded", "Failed", "Suspended"):
            return self.finished_interval
        if not steady or state.error:
            return self.min_interval
        steady_for = min(self.max_interval, max(self.steady_interval, state.interval_seconds or 0.0))
        if progress_seconds:
            steady_for = min(steady_for, max(self.min_interval, float(progress_seconds)))
        return steady_for

    async def observe(self, body: Mapping[str, Any], spec: JobSpec, access: S3Access | None,
                      *, force: bool = False, steady: bool = False) -> SnapshotState | None:
        """The job's snapshot state: the cached listing while it may be reused, else a new one."""
        if spec.snapshot is None or access is None:
            return None
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        status = body.get("status") or {}
        stamp = (meta.get("uid"), meta.get("generation"), status.get("attempt"), hash(access))
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached and not force and cached[1] == stamp and \
                now - cached[0] < self.reuse_for(phase=status.get("phase"), steady=steady, state=cached[2],
                                                 progress_seconds=spec.snapshot.progress_seconds):
            return cached[2]
        task = self._inflight.get(key)
        if task is None or task.done():
            root = contract.job_snapshot_root(spec.snapshot.uri, meta["namespace"], meta["name"])
            seen = (cached[2].progress_etag, cached[2].progress) if cached else (None, None)
            task = asyncio.create_task(self._read(root, access, seen, self.live_cache, self.marker_cache))
            self._inflight[key] = task
        try:
            state = await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout)
        except asyncio.TimeoutError:
            log.warning("snapshot listing of %s/%s is taking longer than %.0fs", *key, self.timeout)
            return cached[2] if cached else SnapshotState(error=f"listing S3 took longer than {self.timeout:.0f}s")
        self._cache[key] = (time.monotonic(), stamp, state)
        return state

    @staticmethod
    async def _read(root: str, access: S3Access, seen: tuple[str | None, contract.Progress | None],
                    live_cache: LiveCache, marker_cache: MarkerCache) -> SnapshotState:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                _LISTING_POOL, functools.partial(read_snapshot_state, root, access, seen, live_cache=live_cache,
                                                 marker_cache=marker_cache))
        except Exception as e:  # S3 down, access denied...: reported in status, never fatal
            state = SnapshotState(error=f"cannot list {root}: {type(e).__name__}: {str(e)[:300]}")
            log.warning("snapshot listing failed: %s", state.error)
            return state

    def forget(self, key: tuple[str, str]) -> None:
        self._cache.pop(key, None)
        self._inflight.pop(key, None)

    def invalidate(self, key: tuple[str, str]) -> None:
        """The next :meth:`observe` of ``key`` lists S3 again (e.g. the operator just wrote a
        snapshot request there). The old state stays as the fallback of a listing that times out."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache[key] = (float("-inf"), cached[1], cached[2])


class FenceWriter:
    """Writes the storage fence (:data:`contract.FENCE_OBJECT`) of an attempt
    before its pods are created (issue 11 item 4).

    Once per (job uid, attempt) and operator process; the store's
    :meth:`~trainingjob_trainer.store.SnapshotStore.write_fence` is itself
    idempotent per attempt (a restarted operator keeps the fence in S3 as it
    is). A write never holds a reconcile for more than ``timeout`` seconds.
    """

    def __init__(self, *, timeout: float = 8.0) -> None:
        self.timeout = timeout
        self._done: dict[tuple[str, str], tuple[str, int]] = {}
        #: Per job: (snapshot root, S3 access), set by the reconcile's observe step.
        self.targets: dict[tuple[str, str], tuple[str, S3Access]] = {}

    async def ensure(self, key: tuple[str, str], *, job_uid: str, attempt: int) -> str | None:
        """Write the fence of ``attempt`` if not done yet; ``None`` when it is
        in S3 (or the job keeps no snapshots), else what went wrong."""
        target = self.targets.get(key)
        if target is None or self._done.get(key) == (job_uid, attempt):
            return None
        root, access = target
        try:
            fence = await asyncio.wait_for(asyncio.to_thread(write_fence, root, access, attempt=attempt,
                                                             job_uid=job_uid), timeout=self.timeout)
        except asyncio.TimeoutError:
            return f"writing {contract.FENCE_OBJECT} under {root} took longer than {self.timeout:.0f}s"
        except Exception as e:  # S3 down, access denied...: reported, retried at the next reconcile
            return f"cannot write {contract.FENCE_OBJECT} under {root}: {type(e).__name__}: {str(e)[:300]}"
        log.info("%s/%s: storage fence at attempt %d (%d older snapshot(s) admitted)", *key, fence.attempt,
                 len(fence.admitted))
        self._done[key] = (job_uid, attempt)
        return None

    def forget(self, key: tuple[str, str]) -> None:
        self._done.pop(key, None)
        self.targets.pop(key, None)


def write_fence(root_uri: str, access: S3Access, *, attempt: int, job_uid: str) -> contract.Fence:
    """Record ``attempt`` of job ``job_uid`` as the owner of ``root_uri`` (blocking; see
    :meth:`~trainingjob_trainer.store.SnapshotStore.write_fence`)."""
    from trainingjob_trainer.store import SnapshotStore

    return SnapshotStore(root_uri, storage_options=access.storage_options()).write_fence(attempt=attempt,
                                                                                           job_uid=job_uid)
