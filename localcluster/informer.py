"""A minimal informer: LIST once, then WATCH from that resourceVersion into a cache.

The node agent reads pods from it instead of listing every pod on every pass
(issue 10: with 4000 pods a LIST costs the API server about a second, and a
pass per watch event kept it busy for everyone else).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from localcluster.kube import ApiError, Client, Obj

log = logging.getLogger("localcluster.nodeagent")


class Informer:
    """Keeps every object of ``resource`` by uid, current as of the last watch event.

    Args:
        client: Its own client (a ``requests.Session`` is not shared across threads).
        resource: The resource to cache (``"pods"``).
        on_event: Called after each change (the agent's wake-up).
    """

    def __init__(self, *, client: Client, resource: str, on_event: Callable[[], None]) -> None:
        self.client = client
        self.resource = resource
        self.on_event = on_event
        self._objects: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()

    def items(self) -> list[Obj]:
        """The cached objects (the list is a copy; the objects are shared, do not keep them)."""
        with self._lock:
            return list(self._objects.values())

    def run(self, stop: threading.Event) -> None:
        """LIST + WATCH until ``stop`` is set; re-LIST when the watch's resourceVersion expired."""
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    raw = self.client.list_raw(self.resource)
                    with self._lock:
                        self._objects = {o["metadata"].get("uid", ""): o for o in raw.get("items") or []}
                    rv = str((raw.get("metadata") or {}).get("resourceVersion") or "") or None
                    self.synced.set()
                    self.on_event()
                for kind, obj in self.client.watch(self.resource, resource_version=rv, timeout=30):
                    if kind == "ERROR":
                        rv = None  # 410 Expired: list again
                        break
                    md = obj.get("metadata") or {}
                    with self._lock:
                        if kind == "DELETED":
                            self._objects.pop(md.get("uid", ""), None)
                        elif kind in ("ADDED", "MODIFIED"):
                            self._objects[md.get("uid", "")] = obj
                    rv = md.get("resourceVersion") or rv
                    self.on_event()
                    if stop.is_set():
                        return
            except ApiError as e:
                log.warning("%s watch: %s; listing again", self.resource, e)
                rv = None
                time.sleep(0.5)
            except Exception:  # noqa: BLE001 - the agent's informer never dies
                log.exception("%s informer", self.resource)
                rv = None
                time.sleep(0.5)
