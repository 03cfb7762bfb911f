"""Cluster DNS on loopback: every pod's and Service's names in an nss_wrapper hosts file.

Split out of :mod:`localcluster.nodeagent` (which writes the file each pass).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Mapping

from localcluster.kube import Obj

LOOPBACK = "127.0.0.1"
LOOPBACK_V4MAPPED = "::ffff:127.0.0.1"


def _selects(svc: Obj, pod: Obj) -> bool:
    """Whether a Service's selector matches the pod's labels (an empty selector selects nothing)."""
    selector = (svc.get("spec") or {}).get("selector") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _host_network(pod: Obj) -> str | None:
    return LOOPBACK


def dns_records(pods: list[Obj], services: list[Obj], *,
                pod_ip: Callable[[Obj], str | None] = _host_network,
                service_fallback: str | None = LOOPBACK) -> dict[str, list[str]]:
    """Every name the cluster DNS would answer for these pods and services, with its addresses.

    As CoreDNS does for a headless Service: a pod's
    ``<hostname>.<subdomain>.<ns>.svc.cluster.local`` (and its shorter search
    forms) exists only while a Service named ``<subdomain>`` in the pod's
    namespace selects the pod, and the pod has an IP and is Ready, unless the
    Service sets ``publishNotReadyAddresses``. A Service's own name resolves to
    the addresses of the pods it publishes (headless), or to
    ``service_fallback`` when it publishes none (127.0.0.1 with the shared
    host network; ``None`` with a network per pod: no record, as CoreDNS has
    none for a headless Service without endpoints). The bare ``<hostname>``
    stays in the shared file: a real pod resolves its own name from its
    ``/etc/hosts``, and all pods of the stand-in share this one file (a gap:
    other pods can resolve it too).

    Args:
        pods: Every pod.
        services: Every Service.
        pod_ip: A pod's address (default: 127.0.0.1, every pod on the host's
            network); ``None``: the pod has none yet, and no record.
        service_fallback: The address of a Service that publishes no pod.
    """
    records: dict[str, set[str]] = {}
    by_name = {((s.get("metadata") or {}).get("namespace", "default"), (s.get("metadata") or {}).get("name")): s
               for s in services}
    published: dict[tuple[str, str], set[str]] = {}
    for pod in pods:
        md, spec = pod.get("metadata", {}), pod.get("spec", {})
        ns = md.get("namespace", "default")
        host = spec.get("hostname") or md.get("name")
        ip = pod_ip(pod)
        if not host or not ip:
            continue
        records.setdefault(host, set()).add(ip)
        sub = spec.get("subdomain")
        svc = by_name.get((ns, sub)) if sub else None
        if svc is not None and _selects(svc, pod) and (
                _ready(pod) or (svc.get("spec") or {}).get("publishNotReadyAddresses")):
            for name in (f"{host}.{sub}", f"{host}.{sub}.{ns}", f"{host}.{sub}.{ns}.svc", f"{host}.{sub}.{ns}.svc.cluster.local"):
                records.setdefault(name, set()).add(ip)
            published.setdefault((ns, sub), set()).add(ip)
    for svc in services:
        md = svc.get("metadata", {})
        name, ns = md.get("name"), md.get("namespace", "default")
        ips = published.get((ns, name)) or ({service_fallback} if service_fallback else set())
        if name and ips:
            for n in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                records.setdefault(n, set()).update(ips)
    records.pop("localhost", None)
    return {n: sorted(ips) for n, ips in sorted(records.items()) if re.fullmatch(r"[A-Za-z0-9.-]+", n)}


def dns_names(pods: list[Obj], services: list[Obj]) -> list[str]:
    """The names of :func:`dns_records` with every pod on the host's network (127.0.0.1)."""
    return list(dns_records(pods, services))


class HostsFile:
    """An nss_wrapper hosts file, rewritten atomically when the names change.

    nss_wrapper reloads the file when its mtime changes, with a resolution of
    one second; every rewrite therefore gets a new, strictly increasing
    whole-second mtime so a process that read it in the same second reloads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: dict[str, list[str]] | None = None
        self._mtime = 0

    def update(self, records: Mapping[str, list[str]] | list[str]) -> bool:
        """Rewrite the file for ``records`` (name -> addresses; a plain list of names maps them to 127.0.0.1)."""
        if not isinstance(records, Mapping):
            records = {n: [LOOPBACK] for n in records}
        if records == self._names and self.path.exists():
            return False
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{ip} {n}" for n, ips in records.items() for ip in ips]
        # c10d (TCPStore) looks names up as AF_INET6 with AI_V4MAPPED first and
        # retries that until its timeout; nss_wrapper does not synthesise
        # v4-mapped answers, so the file carries them explicitly.
        lines += [f"::ffff:{ip} {n}" for n, ips in records.items() for ip in ips]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._mtime = max(self._mtime + 1, int(time.time()))
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, self.path)
        self._names = dict(records)
        return True
