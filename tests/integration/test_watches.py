"""Defect 1: what the operator lists and watches, and what a node heartbeat costs.

* Pods and Services are listed and watched with a server-side label
  selector: the API server stand-in logs every request's query
  (``api-requests.jsonl``), and every pod/Service LIST or WATCH of the
  operator carries ``labelSelector=trainingjob.dev/managed-by=...``; a pod
  that is not the operator's is never sent to it.
* A node heartbeat (a status write that leaves Ready as it was) wakes no job;
  a readiness change wakes exactly the jobs with a pod on that node (pods are
  indexed by node: no scan of every pod). Counted by the operator's
  ``trainingjob_operator_enqueues_total{source="node"}``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest

from localcluster import control
from trainingjob_trainer import contract

from .helpers import TJ, job_manifest, wait_phase
from .test_metrics import free_port, scrape, value, wait_scrape

pytestmark = pytest.mark.integration

SELECTOR = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"


def _requests_since(log: Path, offset: int) -> list[dict]:
    with log.open("rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


@pytest.mark.timeout(120)
def test_defect1_pods_and_services_watched_with_server_side_selector(cluster, kube, namespace, start_operator):
    # A pod that is not the operator's: it must never reach the operator's cache.
    kube.create("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "foreign", "namespace": namespace},
                         "spec": {"containers": [{"name": "c", "image": "x", "command": ["sleep", "30"]}]}},
                namespace=namespace)
    log = Path(cluster.state_dir) / "api-requests.jsonl"
    offset = log.stat().st_size
    start_operator(["--resync-seconds", "1"], name="watches")
    kube.create(TJ, job_manifest("sel", namespace, "print('ok')", nodes=1), namespace=namespace)
    wait_phase(kube, namespace, "sel", "Succeeded", timeout=60)
    cluster.stop_operator("watches")
    reads = [e for e in _requests_since(log, offset)
             if e["user_agent"].startswith("kopf/") and e["resource"] in ("pods", "services")
             and e["verb"] in ("list", "watch")]
    assert {(e["resource"], e["verb"]) for e in reads} >= {("pods", "list"), ("pods", "watch"),
                                                           ("services", "list"), ("services", "watch")}
    without = [f"{e['verb']} {e['path']}?{e['query']}" for e in reads
               if urllib.parse.parse_qs(e["query"]).get("labelSelector") != [SELECTOR]]
    assert not without, "pod/Service reads without the server-side selector:\n" + "\n".join(without)


def _node_enqueues(samples) -> float:
    return value(samples, "trainingjob_operator_enqueues_total", source="node") or 0.0


def _heartbeat(kube, node: str, n: int) -> None:
    """What a kubelet posts every 10 s: the Ready condition's heartbeat time, nothing else changed."""
    for i in range(n):
        obj = kube.get("nodes", node)
        conds = obj["status"]["conditions"]
        for c in conds:
            if c["type"] == "Ready":
                c["lastHeartbeatTime"] = f"2030-01-01T00:00:{i:02d}Z"
        kube.patch("nodes", node, {"status": {"conditions": conds}}, subresource="status", patch_type="strategic")


@pytest.mark.timeout(150)
def test_defect1_node_heartbeat_wakes_no_job(cluster, kube, namespace, start_operator):
    port = free_port()
    start_operator(["--resync-seconds", "600", "--metrics-port", str(port)], name="heartbeats")
    spec = {"podTemplate": {"spec": {"nodeSelector": {"kubernetes.io/hostname": "node-2"}}},
            "recovery": {"nodeNotReadySeconds": 1, "maxPreemptions": 3}}
    kube.create(TJ, job_manifest("hb", namespace, "import time; time.sleep(120)", nodes=1, **spec),
                namespace=namespace)
    wait_phase(kube, namespace, "hb", "Running", timeout=60)
    before = _node_enqueues(wait_scrape(port, lambda s: value(s, "trainingjob_operator_enqueues_total",
                                                             source="event") is not None, "enqueue metric"))
    _heartbeat(kube, "node-2", 10)  # the node that runs the job's pod
    _heartbeat(kube, "node-0", 10)
    control.lose_node(kube, "node-2")
    try:
        # Ready goes Unknown: one wake-up, for the one job with a pod there. The
        # watch delivers in order, so the heartbeats were handled before it.
        after = wait_scrape(port, lambda s: _node_enqueues(s) > before, "a node-driven enqueue", timeout=60)
    finally:
        control.restore_node(kube, "node-2")

    assert _node_enqueues(after) == before + 1, (before, _node_enqueues(after))
    kube.delete(TJ, "hb", namespace=namespace)
