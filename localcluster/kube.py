"""A small synchronous Kubernetes API client for the local cluster stand-in.

Used by the node agent, the tests and the demo. It speaks plain HTTP(S) with
``requests`` and reads a kubeconfig (server, optional bearer token, CA and
client certificate), so it also works against a real cluster. It does NOT use
the ``kubernetes`` pip package (its pins conflict with s3fs's).

Resources are named by their plural (``"pods"``, ``"nodes"``...). Well-known
ones are in :data:`RESOURCES`; others are given as a :class:`Resource`, e.g.
``Resource("trainingjob.dev/v1alpha1", "trainingjobs")``.

Example::

    client = Client.from_kubeconfig("/tmp/lc/kubeconfig")
    pod = client.get("pods", "p", namespace="default")
    for kind, obj in client.watch("pods", namespace="default", timeout=5):
        ...
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import requests
import yaml

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """A REST resource: ``api_version`` (``v1`` or ``group/version``) and plural."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("v1", "pods"),
        Resource("v1", "services"),
        Resource("v1", "secrets"),
        Resource("v1", "configmaps"),
        Resource("v1", "events"),
        Resource("v1", "endpoints"),
        Resource("v1", "serviceaccounts"),
        Resource("v1", "nodes", namespaced=False),
        Resource("v1", "namespaces", namespaced=False),
        Resource("apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False),
        Resource("coordination.k8s.io/v1", "leases"),
        Resource("policy/v1", "poddisruptionbudgets"),
        Resource("trainingjob.dev/v1alpha1", "trainingjobs"),
        Resource("rbac.authorization.k8s.io/v1", "roles"),
        Resource("rbac.authorization.k8s.io/v1", "rolebindings"),
        Resource("rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False),
        Resource("rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False),
    )
}

ResourceRef = str | Resource


def resource_for(ref: ResourceRef) -> Resource:
    """Resolve a plural name (from :data:`RESOURCES`) or pass a Resource through."""
    if isinstance(ref, Resource):
        return ref
    try:
        return RESOURCES[ref]
    except KeyError:
        raise ValueError(f"unknown resource {ref!r}: pass a localcluster.kube.Resource") from None


def resource_of_manifest(obj: Mapping[str, Any]) -> Resource:
    """The resource of a manifest, from its apiVersion and kind."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    for r in RESOURCES.values():
        if r.api_version == api_version and _kind_to_plural(kind) == r.plural:
            return r
    return Resource(api_version, _kind_to_plural(kind), namespaced=kind not in ("Namespace", "Node"))


def _kind_to_plural(kind: str) -> str:
    low = kind.lower()
    if low.endswith("y"):
        return low[:-1] + "ies"
    if low.endswith("s"):
        return low + "es"
    return low + "s"


class ApiError(Exception):
    """An API call answered with an error status.

    Attributes:
        status: HTTP status code (404, 409...).
        reason: The Status ``reason`` (``NotFound``, ``AlreadyExists``...).
        message: The Status ``message``.
        body: The decoded response body, if it was JSON.
    """

    def __init__(self, status: int, message: str, reason: str = "", body: Any = None) -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


class Client:
    """Synchronous Kubernetes client over one ``requests.Session``.

    Args:
        server: API server base URL (``http://127.0.0.1:PORT``).
        token: Optional bearer token.
        verify: ``requests`` verify argument (CA bundle path or bool).
        cert: Optional client certificate ``(cert_path, key_path)``.
        timeout: Default per-request timeout in seconds.
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.verify = verify
        if cert:
            self.session.cert = cert
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["Accept"] = "application/json"

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str] | None = None, *, context: str | None = None) -> "Client":
        """Build a client from a kubeconfig file (default: ``$KUBECONFIG``)."""
        path = path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
        ctx_name = context or cfg.get("current-context")
        contexts = {c["name"]: c.get("context", {}) for c in cfg.get("contexts") or []}
        ctx = contexts.get(ctx_name) if ctx_name else None
        if ctx is None and contexts:
            ctx = next(iter(contexts.values()))
        ctx = ctx or {}
        clusters = {c["name"]: c.get("cluster", {}) for c in cfg.get("clusters") or []}
        users = {u["name"]: u.get("user", {}) or {} for u in cfg.get("users") or []}
        cluster = clusters.get(ctx.get("cluster")) or (next(iter(clusters.values())) if clusters else {})
        user = users.get(ctx.get("user"), {})
        if not cluster.get("server"):
            raise ValueError(f"kubeconfig {path}: no cluster server")
        base = os.path.dirname(os.path.abspath(path))
        verify: bool | str = not cluster.get("insecure-skip-tls-verify", False)
        if cluster.get("certificate-authority-data"):
            verify = _data_file(cluster["certificate-authority-data"])
        elif cluster.get("certificate-authority"):
            verify = os.path.join(base, cluster["certificate-authority"])
        cert = None
        if user.get("client-certificate-data") and user.get("client-key-data"):
            cert = (_data_file(user["client-certificate-data"]), _data_file(user["client-key-data"]))
        elif user.get("client-certificate") and user.get("client-key"):
            cert = (os.path.join(base, user["client-certificate"]), os.path.join(base, user["client-key"]))
        token = user.get("token")
        if not token and user.get("tokenFile"):
            with open(user["tokenFile"], encoding="utf-8") as fh:
                token = fh.read().strip()
        return cls(cluster["server"], token=token, verify=verify, cert=cert)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ raw
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One API call; returns the decoded JSON body; raises :class:`ApiError`."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        resp = self.session.request(
            method,
            self.server + path,
            params={k: v for k, v in (params or {}).items() if v is not None},
            data=data,
            headers=headers,
            timeout=timeout or self.timeout,
        )
        return _decode(resp)

    # ------------------------------------------------------------------ CRUD
    def get(self, resource: ResourceRef, name: str, namespace: str | None = None, *, subresource: str | None = None) -> Obj:
        return self.request("GET", resource_for(resource).path(namespace, name, subresource))

    def get_or_none(self, resource: ResourceRef, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return self.get(resource, name, namespace)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list_raw(
        self,
        resource: ResourceRef,
        namespace: str | None = None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
    ) -> Obj:
        """The List object (``items`` and ``metadata.resourceVersion``)."""
        params = {"labelSelector": _selector(label_selector), "fieldSelector": _selector(field_selector)}
        return self.request("GET", resource_for(resource).path(namespace), params=params)

    def list(
        self,
        resource: ResourceRef,
        namespace: str | None = None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
    ) -> list[Obj]:
        """The items; ``namespace=None`` lists across all namespaces."""
        raw = self.list_raw(resource, namespace, label_selector=label_selector, field_selector=field_selector)
        return list(raw.get("items") or [])

    def create(self, resource: ResourceRef, body: Obj, namespace: str | None = None, *, subresource: str | None = None) -> Obj:
        """POST ``body``; with ``subresource`` (binding, eviction) POSTs to it."""
        r = resource_for(resource)
        ns = namespace or body.get("metadata", {}).get("namespace")
        if subresource:
            return self.request("POST", r.path(ns, body["metadata"]["name"], subresource), body=body)
        return self.request("POST", r.path(ns), body=body)

    def replace(self, resource: ResourceRef, body: Obj, namespace: str | None = None, *, subresource: str | None = None) -> Obj:
        r = resource_for(resource)
        ns = namespace or body.get("metadata", {}).get("namespace")
        return self.request("PUT", r.path(ns, body["metadata"]["name"], subresource), body=body)

    def patch(
        self,
        resource: ResourceRef,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> Obj:
        """PATCH with ``patch_type`` ``merge`` | ``json`` | ``strategic``."""
        return self.request(
            "PATCH",
            resource_for(resource).path(namespace, name, subresource),
            body=patch,
            content_type=PATCH_TYPES[patch_type],
        )

    def delete(
        self,
        resource: ResourceRef,
        name: str,
        namespace: str | None = None,
        *,
        grace_period: int | None = None,
        propagation: str | None = None,
        uid: str | None = None,
    ) -> Obj:
        """DELETE with optional gracePeriodSeconds, propagationPolicy, uid precondition."""
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_period is not None:
            body["gracePeriodSeconds"] = int(grace_period)
        if propagation:
            body["propagationPolicy"] = propagation
        if uid:
            body["preconditions"] = {"uid": uid}
        params = {"gracePeriodSeconds": grace_period, "propagationPolicy": propagation}
        return self.request("DELETE", resource_for(resource).path(namespace, name), params=params, body=body)

    def delete_if_exists(self, resource: ResourceRef, name: str, namespace: str | None = None, **kw: Any) -> bool:
        """DELETE; ``False`` when the object was already gone (404)."""
        try:
            self.delete(resource, name, namespace, **kw)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def apply(self, body: Obj) -> Obj:
        """Create, or replace (with the current resourceVersion) when it exists."""
        r = resource_of_manifest(body)
        ns = body.get("metadata", {}).get("namespace") if r.namespaced else None
        if r.namespaced and not ns:
            ns = "default"
        try:
            return self.create(r, body, ns)
        except ApiError as e:
            if e.status != 409:
                raise
        current = self.get(r, body["metadata"]["name"], ns)
        new = json.loads(json.dumps(body))
        new.setdefault("metadata", {})["resourceVersion"] = current["metadata"].get("resourceVersion")
        return self.replace(r, new, ns)

    # ------------------------------------------------------------------ watch
    def watch(
        self,
        resource: ResourceRef,
        namespace: str | None = None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | Mapping[str, str] | None = None,
        resource_version: str | None = None,
        timeout: float = 30.0,
    ) -> Iterator[tuple[str, Obj]]:
        """Yield ``(type, object)`` (ADDED/MODIFIED/DELETED/...) for ``timeout`` s.

        Ends quietly at the timeout or when the server closes the stream;
        raises :class:`ApiError` if the server refuses the watch (an
        ``ERROR`` event with a Status is yielded as is).
        """
        params = {
            "watch": "true",
            "labelSelector": _selector(label_selector),
            "fieldSelector": _selector(field_selector),
            "resourceVersion": resource_version,
            "timeoutSeconds": max(1, int(timeout)),
            "allowWatchBookmarks": "false",
        }
        deadline = time.monotonic() + timeout
        url = self.server + resource_for(resource).path(namespace)
        resp = self.session.get(
            url,
            params={k: v for k, v in params.items() if v is not None},
            stream=True,
            timeout=(self.timeout, max(1.0, timeout) + 5),
        )
        with resp:
            if resp.status_code >= 400:
                _decode(resp)
            try:
                for line in split_lines(resp.iter_content(chunk_size=WATCH_CHUNK_BYTES)):
                    if line.strip():
                        ev = json.loads(line)
                        yield ev.get("type", ""), ev.get("object") or {}
                    if time.monotonic() > deadline:
                        return
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout):
                # The server closed the stream (its timeout, a restart): the
                # watch is over; callers re-list/re-watch as with any watch.
                return

    # ------------------------------------------------------------------ waiting
    def wait_for(
        self,
        resource: ResourceRef,
        name: str,
        namespace: str | None = None,
        *,
        predicate: Callable[[Obj | None], bool],
        timeout: float = 30.0,
        interval: float = 0.1,
    ) -> Obj | None:
        """Poll one object until ``predicate(obj_or_None)`` holds; return it.

        ``None`` is passed while the object does not exist (so waiting for a
        deletion is ``predicate=lambda o: o is None``). Raises TimeoutError
        with the last object seen.
        """
        last: Obj | None = None

        def check() -> bool:
            nonlocal last
            last = self.get_or_none(resource, name, namespace)
            return predicate(last)

        try:
            wait_until(check, timeout=timeout, interval=interval, what=f"{resource_for(resource).plural}/{name}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last seen: {json.dumps(last)[:2000]}") from None
        return last


#: Read size of a watch stream. With chunked transfer encoding (every watch)
#: urllib3 returns each HTTP chunk as soon as it arrives, up to this size, so
#: a large value costs no latency; reading one byte per call (as this client
#: did) made every event a few thousand Python calls, and events arrived
#: seconds late under load.
WATCH_CHUNK_BYTES = 64 * 1024


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Newline-delimited records of a byte stream, whatever the chunk boundaries."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def wait_until(fn: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Call ``fn`` until it returns something truthy; return that; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def condition(obj: Mapping[str, Any] | None, ctype: str) -> Mapping[str, Any] | None:
    """The ``status.conditions`` entry of type ``ctype``, if any."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _selector(sel: str | Mapping[str, str] | None) -> str | None:
    if sel is None or isinstance(sel, str):
        return sel or None
    return ",".join(f"{k}={v}" for k, v in sel.items()) or None


def _decode(resp: requests.Response) -> Any:
    try:
        body = resp.json() if resp.content else None
    except ValueError:
        body = None
    if resp.status_code >= 400:
        if isinstance(body, dict):
            raise ApiError(resp.status_code, str(body.get("message", "")), str(body.get("reason", "")), body)
        raise ApiError(resp.status_code, resp.text[:500], resp.reason or "", body)
    return body


def _data_file(b64: str) -> str:
    fd, path = tempfile.mkstemp(prefix="lc-kube-", suffix=".pem")
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64decode(b64))
    return path
