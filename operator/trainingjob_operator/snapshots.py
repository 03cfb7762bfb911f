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
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

from trainingjob_trainer import contract

from .classify import parse_time
from .model import JobSpec
from .reconcile import SnapshotState
from .snapshot_requests import LiveCache

log = logging.getLogger(__name__)


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


def read_snapshot_state(root_uri: str, access: S3Access, *, live_cache: LiveCache | None = None) -> SnapshotState:
    """List ``root_uri`` and apply the completion rule to every snapshot folder (blocking).

    Uses the trainer's :class:`~trainingjob_trainer.store.SnapshotStore` (no
    torch): the operator and the pods apply the very same rule to the very
    same listing. With ``live_cache``, the snapshot-request and ack objects
    found in that listing are read too (a GET only when one changed).
    """
    from trainingjob_trainer.store import SnapshotStore

    store = SnapshotStore(root_uri, storage_options=access.storage_options())
    complete = [i for i in store.scan() if i.complete and i.marker is not None]
    live = live_cache.read(store.fs, store._root_path, store.live) if live_cache is not None else None
    if not complete:
        return SnapshotState(latest=None, count=0, live=live)
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
                         live=live)


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
    """Reads each job's snapshot state, at most every ``min_interval`` seconds.

    A listing never holds a reconcile for more than ``timeout`` seconds: a
    slow or unreachable endpoint (chosen by the job's author) leaves the
    listing running in its thread, the reconcile goes on with the last known
    state, and no second listing of that job starts until it ends.
    """

    def __init__(self, *, min_interval: float = 3.0, finished_interval: float = 60.0, timeout: float = 8.0) -> None:
        self.min_interval = min_interval
        self.finished_interval = finished_interval
        self.timeout = timeout
        self._cache: dict[tuple[str, str], tuple[float, Any, SnapshotState]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[SnapshotState]] = {}
        self.live_cache = LiveCache()

    async def observe(self, body: Mapping[str, Any], spec: JobSpec, access: S3Access | None,
                      *, force: bool = False) -> SnapshotState | None:
        if spec.snapshot is None or access is None:
            return None
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        status = body.get("status") or {}
        finished = status.get("phase") in ("Succeeded", "Failed", "Suspended")
        stamp = (meta.get("uid"), status.get("attempt"), finished)
        cached = self._cache.get(key)
        now = time.monotonic()
        interval = self.finished_interval if finished else self.min_interval
        if cached and not force and cached[1] == stamp and now - cached[0] < interval:
            return cached[2]
        task = self._inflight.get(key)
        if task is None or task.done():
            root = contract.job_snapshot_root(spec.snapshot.uri, meta["namespace"], meta["name"])
            task = asyncio.create_task(self._read(root, access, self.live_cache))
            self._inflight[key] = task
        try:
            state = await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout)
        except asyncio.TimeoutError:
            log.warning("snapshot listing of %s/%s is taking longer than %.0fs", *key, self.timeout)
            return cached[2] if cached else SnapshotState(error=f"listing S3 took longer than {self.timeout:.0f}s")
        self._cache[key] = (time.monotonic(), stamp, state)
        return state

    @staticmethod
    async def _read(root: str, access: S3Access, live_cache: LiveCache) -> SnapshotState:
        try:
            return await asyncio.to_thread(read_snapshot_state, root, access, live_cache=live_cache)
        except Exception as e:  # S3 down, access denied...: reported in status, never fatal
            state = SnapshotState(error=f"cannot list {root}: {type(e).__name__}: {str(e)[:300]}")
            log.warning("snapshot listing failed: %s", state.error)
            return state

    def forget(self, key: tuple[str, str]) -> None:
        self._cache.pop(key, None)
        self._inflight.pop(key, None)

    def refresh(self, key: tuple[str, str]) -> None:
        """The next :meth:`observe` of ``key`` lists S3 again (the operator just wrote there)."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache[key] = (float("-inf"), cached[1], cached[2])
