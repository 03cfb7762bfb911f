"""The stand-in's own latency, with no operator (issue 10): is the API server
stand-in fast enough to measure an operator at 500 jobs x 8 pods against it?

Run (not part of ``make test``; under the heavy lock, it loads both CPUs)::

    flock /tmp/tj-heavy.lock .venv/bin/python bench/standin.py                 # 4000 pods, no node agent
    flock /tmp/tj-heavy.lock .venv/bin/python bench/standin.py --hollow-nodes 100   # a hollow agent serves them

Measured in ONE run against one API server (``python -m localcluster.apiserver``):

* watch delivery: the time from just before a pod's POST to its ADDED event
  reaching a watcher on the pods of the namespace, p50/p99 of ``--samples``
  creates, with 0 pods in the store and with ``--pods``; two watchers at once:
  a raw reader (each HTTP chunk as it arrives: the server's own latency) and
  :meth:`localcluster.kube.Client.watch` (what tests and the agent use);
* the POST itself (p50/p99);
* a LIST of all ``--pods`` pods: seconds (median of 5; decoded, and bytes only) and bytes;
* a labelled LIST that matches 8 of them (median of 20).

With ``--hollow-nodes M`` a node agent with M hollow nodes
(:mod:`localcluster.hollow`) binds and runs every pod, so the figures include
its load (a LIST of all pods per pass, a status write per pod change); without
it the node agent is stopped once the cluster is up and only the benchmark
talks to the API server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from localcluster.cluster import LocalCluster
from localcluster.kube import Client, wait_until

NS = "bench"
PER_GROUP = 8


def pod_body(name: str, group: int) -> dict[str, Any]:
    """A pod the size of an operator's gang pod (labels, annotations, env, resources)."""
    labels = {"app.kubernetes.io/name": "trainingjob", "trainingjob.dev/job": f"job-{group}",
              "trainingjob.dev/attempt": "0", "trainingjob.dev/rank": str(int(name.rsplit("-", 1)[1]) % PER_GROUP),
              "group": f"g{group}"}
    env = [{"name": f"TJ_VAR_{i}", "value": f"value-{i}-{name}"} for i in range(12)]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"trainingjob.dev/spec-hash": "0123456789abcdef" * 2}},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "hostname": name, "subdomain": f"job-{group}",
            "containers": [{"name": "trainer", "image": "ghcr.io/acme/trainer:1.0",
                            "command": ["torchrun", "--nnodes", "8", "-m", "acme.train"], "env": env,
                            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}],
        },
    }


class Watcher:
    """Records when each pod's ADDED event arrives, from one watch stream in a thread."""

    def __init__(self, events: Callable[[], Iterator[tuple[str, dict[str, Any]]]]) -> None:
        self.seen: dict[str, float] = {}
        self._events = events
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                for kind, obj in self._events():
                    self._ready.set()
                    if kind == "ADDED":
                        self.seen.setdefault(obj["metadata"]["name"], time.monotonic())
            except Exception:  # noqa: BLE001 - the server went away (end of the run): retry quietly
                time.sleep(0.5)

    def wait_ready(self) -> None:
        if not self._ready.wait(30):
            raise TimeoutError("the watch stream never started")


def raw_events(client: Client) -> Iterator[tuple[str, dict[str, Any]]]:
    """A watch read chunk by chunk as the server sends it (no client-side buffering delay)."""
    url = f"{client.server}/api/v1/namespaces/{NS}/pods"
    with client.session.get(url, params={"watch": "true", "timeoutSeconds": "600"}, stream=True, timeout=(10, 700)) as resp:
        buf = b""
        for chunk in resp.iter_content(chunk_size=None):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    ev = json.loads(line)
                    yield ev.get("type", ""), ev.get("object") or {}


def client_events(client: Client) -> Iterator[tuple[str, dict[str, Any]]]:
    return client.watch("pods", NS, timeout=600)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def watch_latency(*, kube: Client, watchers: dict[str, Watcher], prefix: str, samples: int) -> dict[str, list[float]]:
    """Create ``samples`` pods one by one; per watcher, the create -> ADDED-seen latencies."""
    out: dict[str, list[float]] = {"post": [], **{k: [] for k in watchers}}
    for i in range(samples):
        name = f"{prefix}-{i}"
        t0 = time.monotonic()
        kube.create("pods", pod_body(name, 100000 + i // PER_GROUP), NS)
        out["post"].append(time.monotonic() - t0)
        wait_until(lambda: all(name in w.seen for w in watchers.values()), timeout=60, interval=0.002,
                   what=f"the ADDED event of {name}")
        for key, w in watchers.items():
            out[key].append(w.seen[name] - t0)
    return out


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.monotonic()
        result = fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=4000)
    ap.add_argument("--samples", type=int, default=50, help="creates per watch-latency measurement")
    ap.add_argument("--hollow-nodes", type=int, default=0, help="run a hollow node agent with this many nodes")
    a = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="lc-bench-standin-"))
    nodes = [f"hollow-{i:03d}" for i in range(a.hollow_nodes)]
    config = {"*": {"capacity": {"cpu": "1000", "memory": "1000Gi", "pods": "1000"}}}
    lc = LocalCluster(state, nodes=nodes, with_s3=False, hollow=True, node_config=config).start(timeout=180)
    try:
        if not nodes:
            lc.processes["nodeagent"].stop()
        kube = lc.client()
        kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        kube.create("pods", pod_body("warm-0", 99999), NS)  # every new watch starts with its ADDED
        watchers = {"raw": Watcher(lambda: raw_events(lc.client())), "client": Watcher(lambda: client_events(lc.client()))}
        for w in watchers.values():
            w.wait_ready()
        rows: list[tuple[str, str]] = []
        empty = watch_latency(kube=kube, watchers=watchers, prefix="lat0", samples=a.samples)

        t0 = time.monotonic()
        for i in range(a.pods - 2 * a.samples - 1):
            kube.create("pods", pod_body(f"fill-{i}", i // PER_GROUP), NS)
        fill_s = time.monotonic() - t0
        if nodes:
            wait_until(lambda: sum((p.get("status") or {}).get("phase") == "Running" for p in kube.list("pods", NS)) >= a.pods - a.samples,
                       timeout=600, interval=2.0, what="the hollow agent to run every pod")
        full = watch_latency(kube=kube, watchers=watchers, prefix="latn", samples=a.samples)
        total = len(kube.list("pods", NS))

        list_s, items = timed(lambda: kube.list("pods", NS), 5)
        raw_s, list_bytes = timed(lambda: len(kube.session.get(f"{kube.server}/api/v1/namespaces/{NS}/pods", timeout=60).content), 5)
        sel_s, sel = timed(lambda: kube.list("pods", NS, label_selector="group=g17"), 20)

        for label, res in ((f"0 pods", empty), (f"{total} pods", full)):
            for key, title in (("post", "POST pod"), ("raw", "create -> ADDED, raw chunked reader"),
                               ("client", "create -> ADDED, kube.Client.watch")):
                rows.append((f"{title}, {label}", f"p50 {pct(res[key], .5) * 1000:.1f} ms, p99 {pct(res[key], .99) * 1000:.1f} ms"))
        rows.append((f"create {a.pods - 2 * a.samples - 1} pods, one by one", f"{fill_s:.1f} s"))
        rows.append((f"LIST {len(items)} pods (decoded)", f"{list_s:.3f} s, {list_bytes / 1e6:.1f} MB"))
        rows.append((f"LIST {len(items)} pods (bytes only, no JSON decode)", f"{raw_s:.3f} s"))
        rows.append((f"LIST labelSelector group=g17 ({len(sel)} of {len(items)})", f"{sel_s * 1000:.1f} ms"))
        agent = f"hollow agent, {len(nodes)} nodes" if nodes else "no node agent"
        print(f"\n### The stand-in alone ({agent}, {total} pods)\n")
        print("| measurement | result |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        print(f"\nstandin pods={total} nodes={len(nodes)} watch_p50_ms={pct(full['raw'], .5) * 1000:.1f} "
              f"watch_p99_ms={pct(full['raw'], .99) * 1000:.1f} client_watch_p99_ms={pct(full['client'], .99) * 1000:.1f} "
              f"list_s={list_s:.3f} list_mb={list_bytes / 1e6:.1f} label_list_ms={sel_s * 1000:.1f}")
    finally:
        lc.stop()


if __name__ == "__main__":
    main()
