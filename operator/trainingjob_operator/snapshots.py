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

from .model import JobSpec
from .reconcile import SnapshotState

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

    def storage_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
        client: dict[str, Any] = {}
        if self.endpoint:
            client["endpoint_url"] = self.endpoint
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        if self.key:
            opts.update(key=self.key, secret=self.secret)
            if self.token:
                opts["token"] = self.token
        return opts


def _strip(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


def read_snapshot_state(root_uri: str, access: S3Access) -> SnapshotState:
    """List ``root_uri`` and apply the completion rule to every snapshot folder (blocking)."""
    import s3fs  # imported here: only the operator needs it at run time

    fs = s3fs.S3FileSystem(**access.storage_options())
    root = _strip(root_uri).rstrip("/")
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return SnapshotState(latest=None, count=0)
    complete: list[tuple[str, contract.CommitMarker]] = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or contract.parse_snapshot_dir_name(name) is None:
            continue
        try:
            marker = contract.CommitMarker.from_json(fs.cat_file(f"{path}/{contract.COMMIT_MARKER}"))
        except FileNotFoundError:
            continue
        if marker is None:
            continue
        listing = {
            f[len(path) + 1:]: {"size": info.get("size"), "etag": info.get("ETag") or info.get("etag")}
            for f, info in fs.find(path, detail=True).items()
        }
        if contract.snapshot_is_complete(marker, name, listing):
            complete.append((f"s3://{path}", marker))
    best = contract.pick_latest(complete)
    if best is None:
        return SnapshotState(latest=None, count=0)
    uri, m = best
    newest_two = sorted((mk.step, mk.saved_at) for _, mk in complete)[-2:]
    interval = None
    if len(newest_two) == 2:
        from .classify import parse_time

        a, b = parse_time(newest_two[0][1]), parse_time(newest_two[1][1])
        if a and b and b > a:
            interval = (b - a).total_seconds()
    latest = {"uri": uri, "epoch": m.epoch, "step": m.step, "savedAt": m.saved_at, "bytes": m.total_bytes,
              "seconds": round(float(m.seconds), 3), "emergency": bool(m.emergency)}
    return SnapshotState(latest=latest, count=len(complete), interval_seconds=interval)


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
    """Reads each job's snapshot state at most every ``min_interval`` seconds."""

    def __init__(self, *, min_interval: float = 3.0) -> None:
        self.min_interval = min_interval
        self._cache: dict[tuple[str, str], tuple[float, Any, SnapshotState]] = {}

    async def observe(self, body: Mapping[str, Any], spec: JobSpec, access: S3Access | None,
                      *, force: bool = False) -> SnapshotState | None:
        if spec.snapshot is None or access is None:
            return None
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        stamp = (meta.get("uid"), (body.get("status") or {}).get("attempt"))
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached and not force and cached[1] == stamp and now - cached[0] < self.min_interval:
            return cached[2]
        root = contract.job_snapshot_root(spec.snapshot.uri, meta["namespace"], meta["name"])
        try:
            state = await asyncio.to_thread(read_snapshot_state, root, access)
        except Exception as e:  # S3 down, access denied...: reported in status, never fatal
            state = SnapshotState(error=f"cannot list {root}: {type(e).__name__}: {str(e)[:300]}")
            log.warning("snapshot listing failed for %s/%s: %s", *key, state.error)
        self._cache[key] = (now, stamp, state)
        return state

    def forget(self, key: tuple[str, str]) -> None:
        self._cache.pop(key, None)
