"""Helpers of the integration tests: TrainingJob manifests and watching them."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from localcluster.kube import ApiError, Client

TJ = "trainingjobs"


def job_manifest(name: str, namespace: str, code: str, *, nodes: int = 3, **spec: Any) -> dict[str, Any]:
    """A TrainingJob whose pods run ``python -c code`` (no torch)."""
    body: dict[str, Any] = {
        "apiVersion": "trainingjob.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "local/none:0", "command": [sys.executable, "-c", code], "nodes": nodes},
    }
    body["spec"].update(spec)
    return body


def status(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(TJ, name, namespace=namespace).get("status") or {}


def wait_status(kube: Client, namespace: str, name: str, pred: Callable[[dict[str, Any]], bool],
                timeout: float = 60.0, what: str = "status") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = status(kube, namespace, name)
        except ApiError:
            last = {}
        if pred(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} of {namespace}/{name}; last status: {last}")


def wait_phase(kube: Client, namespace: str, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
    return wait_status(kube, namespace, name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")


def pods_of(kube: Client, namespace: str, job: str) -> list[dict[str, Any]]:
    return kube.list("pods", namespace=namespace, label_selector=f"trainingjob.dev/job-name={job}")


def events_of(kube: Client, namespace: str, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("events", namespace=namespace)
            if (e.get("involvedObject") or {}).get("name") == name]


class Recorder:
    """Keeps a job's timeline in the background: every phase it passes through
    (from a watch, so a phase that lasts less than a poll is not missed), and
    when its pods are first seen and gone (polled)."""

    def __init__(self, kube: Client, namespace: str, name: str, interval: float = 0.1) -> None:
        self.kube, self.namespace, self.name, self.interval = kube, namespace, name, interval
        self.phases: list[str] = []
        #: (monotonic time, pod name, "seen" | "gone")
        self.pod_timeline: list[tuple[float, str, str]] = []
        self._present: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True),
                         threading.Thread(target=self._watch_phases, daemon=True)]
        self._watching = threading.Event()

    def __enter__(self) -> "Recorder":
        for t in self._threads:
            t.start()
        self._watching.wait(timeout=10)  # the watch is open before the test creates the job
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        # The test may have seen the last change (polling on its own) before
        # the watch delivered it: read it once more so the timeline ends with
        # the state the test saw.
        try:
            self._note_phase(status(self.kube, self.namespace, self.name).get("phase"))
        except ApiError:
            pass
        self._sample()

    def _note_phase(self, phase: str | None) -> None:
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(phase)

    def _watch_phases(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                stream = self.kube.watch(TJ, self.namespace, field_selector=f"metadata.name={self.name}",
                                         resource_version=rv, timeout=2)
                self._watching.set()
                for typ, obj in stream:
                    if typ == "ERROR":  # e.g. 410 Gone: start over from the current state
                        rv = None
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    self._note_phase((obj.get("status") or {}).get("phase"))
            except ApiError:
                rv = None
                time.sleep(self.interval)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def _sample(self) -> None:
        try:
            names = {p["metadata"]["name"] for p in pods_of(self.kube, self.namespace, self.name)}
        except ApiError:
            names = self._present
        now = time.monotonic()
        for n in sorted(names - self._present):
            self.pod_timeline.append((now, n, "seen"))
        for n in sorted(self._present - names):
            self.pod_timeline.append((now, n, "gone"))
        self._present = names

    def first(self, prefix: str, what: str) -> float | None:
        return next((t for t, n, w in self.pod_timeline if n.startswith(prefix) and w == what), None)

    def last(self, prefix: str, what: str) -> float | None:
        ts = [t for t, n, w in self.pod_timeline if n.startswith(prefix) and w == what]
        return max(ts) if ts else None


def kubectl_get_tj(kubeconfig: str, namespace: str, *args: str) -> list[dict[str, str]]:
    """``kubectl get tj`` (the server-side printed columns), one ``{HEADER: cell}`` per row.

    Cells are cut at the header's column offsets (kubectl pads with spaces and
    leaves an absent value empty).
    """
    import os
    import re
    import subprocess

    out = subprocess.run(["kubectl", "get", "tj", "-n", namespace, *args], capture_output=True, text=True,
                         env={**os.environ, "KUBECONFIG": kubeconfig}, timeout=30, check=True).stdout
    header, *rows = out.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    return [{n: row[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None])} for row in rows]
