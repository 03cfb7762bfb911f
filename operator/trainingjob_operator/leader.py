"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection`` does it.

Why not Kopf's peering: Kopf 1.45's peering keeps ``KopfPeering`` custom
objects (a CRD of its own, cluster-wide RBAC for ``ClusterKopfPeering``) and
*pauses* operators of lower priority; it is not a lock with a lease duration
and fencing by resourceVersion, and two operators of equal priority both run.
A Lease is what every Kubernetes controller uses (kube-controller-manager,
JobSet, Kueue): one small object, ``get/create/update`` on ``leases`` in the
operator's namespace.

The rules (client-go's):

* The lease is free when it has no holder, or when its record has not
  changed for ``lease_duration`` seconds *as observed by this process*
  (never by comparing clocks with the holder).
* Taking or renewing is an ``update`` carrying the resourceVersion read; a
  409 means another replica won the race.
* The holder renews every ``retry_period``; if it cannot renew for
  ``renew_deadline`` (< ``lease_duration``) it stops leading: the operator
  exits, and the Deployment restarts it as a follower. A follower only
  becomes leader after the old lease expired, so two leaders never act at
  once as long as ``renew_deadline`` < ``lease_duration``.
* On a clean shutdown the leader releases the lease (holder cleared), so the
  next replica takes over at once instead of after ``lease_duration``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .kube import ApiError, Kube

log = logging.getLogger("trainingjob_operator.leader")

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


@dataclass(frozen=True)
class ElectionConfig:
    """Where the lease lives, who we are, and client-go's three timings (seconds)."""

    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration")


def _micro_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire the Lease, keep it, and tell the caller when leading starts and stops.

    Args:
        kube: The operator's API client.
        config: The lease and timings.
        clock: Monotonic clock (injectable for tests).
    """

    def __init__(self, *, kube: Kube, config: ElectionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.config = config
        self._clock = clock
        self._observed_record: dict[str, Any] | None = None
        self._observed_at = 0.0
        self.leading = False

    @property
    def _path(self) -> str:
        return LEASES.format(namespace=self.config.namespace)

    def _spec(self, *, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = _micro_time(dt.datetime.now(dt.timezone.utc))
        return {"holderIdentity": self.config.identity, "leaseDurationSeconds": max(1, int(self.config.lease_duration)),
                "acquireTime": acquired or now, "renewTime": now, "leaseTransitions": transitions}

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the lease afterwards."""
        cfg = self.config
        try:
            lease = await self.kube.request("GET", f"{self._path}/{cfg.name}")
        except ApiError as e:
            if e.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                    "spec": self._spec(transitions=0, acquired=None)}
            try:
                created = await self.kube.request("POST", self._path, body=body)
            except ApiError as e2:
                if e2.status == 409:
                    return False
                raise
            self._observe(created.get("spec") or {})
            return True
        spec = lease.get("spec") or {}
        self._observe(spec)
        holder = spec.get("holderIdentity") or ""
        mine = holder == cfg.identity
        expired = self._clock() - self._observed_at >= float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
        if holder and not mine and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._spec(transitions=transitions, acquired=spec.get("acquireTime") if mine else None)
        try:
            updated = await self.kube.request("PUT", f"{self._path}/{cfg.name}", body=lease)
        except ApiError as e:
            if e.status == 409:  # someone else renewed or took it since our read
                return False
            raise
        self._observe(updated.get("spec") or {})
        return True

    def _observe(self, spec: dict[str, Any]) -> None:
        record = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseTransitions", "acquireTime")}
        if record != self._observed_record:
            self._observed_record = record
            self._observed_at = self._clock()

    async def release(self) -> None:
        """Give the lease up (clean shutdown): the next replica need not wait for it to expire."""
        if not self.leading:
            return
        self.leading = False
        cfg = self.config
        try:
            lease = await self.kube.request("GET", f"{self._path}/{cfg.name}")
            if (lease.get("spec") or {}).get("holderIdentity") != cfg.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
            await self.kube.request("PUT", f"{self._path}/{cfg.name}", body=lease)
            log.info("released the leader lease %s/%s", cfg.namespace, cfg.name)
        except ApiError as e:
            log.warning("could not release the leader lease: %s", e)

    async def run(self, *, on_started_leading: Callable[[], Awaitable[None]]) -> None:
        """Wait for the lease, call ``on_started_leading``, renew until it cannot; then return.

        Returns only when leadership is lost (the caller exits the process).
        """
        cfg = self.config
        while not self.leading:
            try:
                self.leading = await self.try_acquire_or_renew()
            except (ApiError, OSError, asyncio.TimeoutError) as e:
                log.warning("leader election: %s", e)
            if not self.leading:
                await asyncio.sleep(cfg.retry_period)
        log.info("became the leader (lease %s/%s, identity %s)", cfg.namespace, cfg.name, cfg.identity)
        await on_started_leading()
        last_renew = self._clock()
        while True:
            await asyncio.sleep(cfg.retry_period)
            try:
                ok = await asyncio.wait_for(self.try_acquire_or_renew(), timeout=cfg.renew_deadline)
            except (ApiError, OSError, asyncio.TimeoutError) as e:
                log.warning("leader election: renew failed: %s", e)
                ok = False
            if ok:
                last_renew = self._clock()
            elif self._clock() - last_renew >= cfg.renew_deadline:
                self.leading = False
                log.error("lost the leader lease %s/%s (not renewed for %.0fs)", cfg.namespace, cfg.name,
                          cfg.renew_deadline)
                return
