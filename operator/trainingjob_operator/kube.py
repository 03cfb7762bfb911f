"""A small async Kubernetes API client: one aiohttp session for the process.

Kopf watches and caches; this client does the writes the plan asks for
(create/delete pods and services, patch status, post Events) and reads the
credentials Secret. It logs in as :mod:`.kubeconfig` says (controller-runtime's
order; token files are re-read so projected tokens rotate; exec plugins).
Creates treat 409 AlreadyExists as success and deletes treat 404 as success.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from typing import Any, Mapping

import aiohttp

from .kubeconfig import Config, load_config

#: Events whose count this process can bump (LRU): client-go's correlator keeps 4096.
MAX_REMEMBERED_EVENTS = 4096


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _plural_path(kind: str) -> tuple[str, str]:
    return {
        "Pod": ("/api/v1", "pods"),
        "Service": ("/api/v1", "services"),
        "Secret": ("/api/v1", "secrets"),
        "Event": ("/api/v1", "events"),
    }[kind]


class Kube:
    """The operator's API client (one per process)."""

    def __init__(self, config: Config | None = None, *, user_agent: str = "trainingjob-operator/0.1") -> None:
        self._config = config or load_config()
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._events: dict[str, int] = {}  # Event name -> the count this process last wrote
        #: time.monotonic() of the last answer from the API server (any status): readiness.
        self.last_answer: float | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _token(self) -> str | None:
        if self._config.exec_spec is not None:
            return await asyncio.to_thread(self._config.bearer_token)  # the plugin may take seconds
        return self._config.bearer_token()

    async def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                headers={"User-Agent": self._user_agent},
            )
        headers = {"Accept": "application/json"}
        token = await self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self._session.request(method, self._config.server + path, data=data, headers=headers,
                                         params=params, ssl=self._config.ssl_context) as resp:
            text = await resp.text()
            self.last_answer = time.monotonic()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"message": text[:500]}
            if resp.status == 401:
                self._config.unauthorized()
            if resp.status >= 400:
                raise ApiError(resp.status, payload.get("reason", resp.reason or ""), payload.get("message", ""))
            return payload

    # -- verbs the operator uses (and only these: the chart's RBAC grants exactly them) --
    async def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> bool:
        """Create with ``fieldValidation=Strict``; ``False`` if it already existed (409 is success)."""
        prefix, plural = _plural_path(kind)
        try:
            # Strict: a field the API server does not know (a typo, or a field
            # at the wrong level in podTemplate) is refused (400), never dropped.
            await self.request("POST", f"{prefix}/namespaces/{namespace}/{plural}", body=body,
                               params={"fieldValidation": "Strict"})
            return True
        except ApiError as e:
            if e.status == 409:
                return False
            raise

    async def delete(self, kind: str, namespace: str, name: str, *, force: bool = False) -> bool:
        """Delete (background propagation); ``False`` if it was already gone (404 is success).

        ``force`` sets gracePeriodSeconds=0, for pods on a lost node.
        """
        prefix, plural = _plural_path(kind)
        opts: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if force:
            opts["gracePeriodSeconds"] = 0
        try:
            await self.request("DELETE", f"{prefix}/namespaces/{namespace}/{plural}/{name}", body=opts)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def patch_status(self, group: str, version: str, plural: str, namespace: str, name: str,
                           status_patch: Mapping[str, Any], *, resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the status; with ``resource_version``, only if the object is still at it (else 409)."""
        body: dict[str, Any] = {"status": status_patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.request(
            "PATCH", f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status",
            body=body, content_type="application/merge-patch+json")

    async def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str,
                         now_iso: str) -> str:
        """Record an Event, aggregated and idempotent; returns "created", "counted" or "exists".

        Like client-go's EventCorrelator: the same (object uid, type, reason,
        message) again from this process bumps ``count`` and ``lastTimestamp``
        of the one Event instead of adding another (a quota 403 retried every
        few seconds is one Event with a count). The Event's name is derived
        from that key, so a new operator process re-posting what a killed one
        had already posted finds it there (409) and changes nothing.
        """
        meta = involved["metadata"]
        ns = meta["namespace"]
        message = message[:1024]
        digest = hashlib.sha256("\0".join((meta.get("uid") or "", type_, reason, message)).encode()).hexdigest()
        name = f"{meta['name'][:200]}.{digest[:16]}"
        count = self._events.get(name)
        if count is not None:
            try:
                await self.request("PATCH", f"/api/v1/namespaces/{ns}/events/{name}",
                                   body={"count": count + 1, "lastTimestamp": now_iso},
                                   content_type="application/merge-patch+json")
                self._remember_event(name, count + 1)
                return "counted"
            except ApiError as e:
                if e.status != 404:  # 404: the Event expired (TTL): record it anew
                    raise
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": meta["name"], "namespace": ns, "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "trainingjob-operator"},
            "reportingComponent": "trainingjob-operator",
            "reportingInstance": os.environ.get("HOSTNAME", "trainingjob-operator"),
            "firstTimestamp": now_iso,
            "lastTimestamp": now_iso,
            "count": 1,
        }
        try:
            await self.request("POST", f"/api/v1/namespaces/{ns}/events", body=event)
        except ApiError as e:
            if e.status != 409:
                raise
            self._remember_event(name, 1)
            return "exists"
        self._remember_event(name, 1)
        return "created"

    def _remember_event(self, name: str, count: int) -> None:
        self._events.pop(name, None)
        self._events[name] = count
        while len(self._events) > MAX_REMEMBERED_EVENTS:
            self._events.pop(next(iter(self._events)))


class SecretCache:
    """Credentials Secrets read through :meth:`Kube.get_secret`, cached per (namespace, name).

    Jobs of a namespace usually share one Secret, so a cached read serves
    them all. An entry lives ``ttl`` seconds (a rotated Secret is seen within
    that time) and is dropped at once by :meth:`invalidate`: when S3 refused
    or failed a listing made with it, the next reconcile reads the Secret
    again. Absent Secrets are not cached (a user who creates it is seen at
    the job's next reconcile). Not a watch: watching Secrets would take list
    and watch on every Secret the operator can read (all of the cluster's,
    in the default cluster-wide install) and a stream of every change to them.
    """

    def __init__(self, kube: Kube, *, ttl: float = 300.0, clock: Any = time.monotonic) -> None:
        self._kube = kube
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret (cached while fresh), or ``None`` if it does not exist."""
        key = (namespace, name)
        hit = self._cache.get(key)
        if hit is not None and self._clock() - hit[0] < self.ttl:
            return hit[1]
        secret = await self._kube.get_secret(namespace, name)
        if secret is None:
            self._cache.pop(key, None)
        else:
            self._cache[key] = (self._clock(), secret)
        return secret

    def invalidate(self, namespace: str, name: str) -> None:
        """Read this Secret from the API server again next time."""
        self._cache.pop((namespace, name), None)
