"""Issue 10, hollow nodes: a 100-node hollow stand-in serving 1000 pods.

Pods on hollow nodes run no process; they follow the schedule of their
``localcluster.trainingjob.dev/hollow-*`` annotations, and graceful deletion,
preemption and node loss behave as for process pods.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from localcluster import hollow
from localcluster.cluster import LocalCluster, lose_node, preempt
from localcluster.kube import Client, condition, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NODES = [f"hollow-{i:03d}" for i in range(100)]
PODS = 1000
NS = "hollow"
#: Pods that finish on schedule: name -> (run seconds, exit code, termination message).
SCHEDULED = {f"done-{i}": (2, 0 if i % 2 == 0 else 7, f"finished {i}") for i in range(10)}


def pod_manifest(name: str, annotations: dict[str, str] | None = None, grace: int = 30) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "hollow"}, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "main", "image": "ignored:latest", "command": ["does-not-exist"]}],
        },
    }


@pytest.fixture(scope="module")
def hollow_cluster() -> Iterator[tuple[LocalCluster, Client]]:
    state_dir = Path(tempfile.mkdtemp(prefix="lc-hollow-"))
    lc = LocalCluster(state_dir, nodes=NODES, with_s3=False, hollow=True, node_monitor_grace_seconds=2.0)
    lc.start(timeout=120)
    kube = lc.client()
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    try:
        yield lc, kube
    finally:
        lc.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def phases(kube: Client) -> dict[str, tuple[str | None, dict[str, Any]]]:
    return {p["metadata"]["name"]: ((p.get("status") or {}).get("phase"), p) for p in kube.list("pods", NS)}


def requests_since(lc: LocalCluster, t0: float) -> list[dict[str, Any]]:
    """The API server's request log (every request, with its verb) from ``t0`` on."""
    lines = (lc.state_dir / "api-requests.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["ts"] >= t0]


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def test_hollow_100_nodes_serve_1000_pods(hollow_cluster: tuple[LocalCluster, Client]) -> None:
    lc, kube = hollow_cluster
    nodes = {n["metadata"]["name"]: n for n in kube.list("nodes")}
    assert set(NODES) <= set(nodes)
    assert nodes[NODES[0]]["status"]["nodeInfo"]["containerRuntimeVersion"] == hollow.RUNTIME_VERSION

    for name, (run, code, message) in SCHEDULED.items():
        kube.create("pods", pod_manifest(name, {hollow.RUN_SECONDS: str(run), hollow.EXIT_CODE: str(code),
                                                hollow.TERMINATION_MESSAGE: message}), NS)
    kube.create("pods", pod_manifest("stubborn", {hollow.IGNORE_SIGTERM: "true"}, grace=3), NS)
    kube.create("pods", pod_manifest("bad-schedule", {hollow.RUN_SECONDS: "soon"}), NS)
    for i in range(PODS - len(SCHEDULED) - 1):
        kube.create("pods", pod_manifest(f"p-{i:04d}"), NS)

    def all_started() -> bool:
        seen = phases(kube)
        return sum(1 for ph, _ in seen.values() if ph in ("Running", "Succeeded", "Failed")) >= PODS
    wait_until(all_started, timeout=150, interval=1.0, what="1000 hollow pods to start")

    # A malformed schedule keeps its pod Pending with an actionable message.
    bad = kube.get("pods", "bad-schedule", NS)
    waiting = bad["status"]["containerStatuses"][0]["state"]["waiting"]
    assert bad["status"]["phase"] == "Pending" and hollow.RUN_SECONDS in waiting["message"]

    # Every pod is bound to a hollow node, spread over all of them.
    seen = phases(kube)
    used = {p["spec"]["nodeName"] for ph, p in seen.values() if ph}
    assert used <= set(NODES) and len(used) == len(NODES)
    forever = [name for name, (ph, _) in seen.items() if name.startswith("p-") and ph == "Running"]
    assert len(forever) == PODS - len(SCHEDULED) - 1

    # Scheduled pods finish with their exit codes and termination messages.
    def scheduled_done() -> bool:
        return all(seen[n][0] in ("Succeeded", "Failed") for n in SCHEDULED if (seen := phases(kube)))
    wait_until(scheduled_done, timeout=30, interval=0.5, what="the scheduled hollow pods to finish")
    seen = phases(kube)
    for name, (_, code, message) in SCHEDULED.items():
        ph, pod = seen[name]
        state = terminated(pod)
        assert (ph, state["exitCode"], state["message"]) == ("Succeeded" if code == 0 else "Failed", code, message)
        assert state["reason"] == ("Completed" if code == 0 else "Error")

    # Steady state is cheap: over a heartbeat period (many passes) the agent neither
    # lists every pod nor makes a per-pod request (nothing changed).
    t0 = time.time()
    beat = (condition(kube.get("nodes", NODES[0]), "Ready") or {}).get("lastHeartbeatTime")
    wait_until(lambda: (condition(kube.get("nodes", NODES[0]), "Ready") or {}).get("lastHeartbeatTime") != beat,
               timeout=30, interval=0.5, what=f"a heartbeat of {NODES[0]}")
    window = [r for r in requests_since(lc, t0) if r["resource"] == "pods"]
    assert not [r for r in window if r["verb"] == "list" and r["namespace"] is None], "the agent LISTs all pods per pass"
    assert not [r for r in window if r["verb"] not in ("list", "watch")], "per-pod requests in a steady state"

    # Preemption: DisruptionTarget, SIGTERM honoured at once, the pod is gone.
    victim = forever[0]
    answered = preempt(kube, NS, victim)
    assert (condition(answered, "DisruptionTarget") or {}).get("status") == "True"
    assert kube.wait_for("pods", victim, NS, predicate=lambda p: p is None, timeout=20) is None

    # A pod that ignores SIGTERM lives out its grace period, then is killed and gone.
    t0 = time.monotonic()
    preempt(kube, NS, "stubborn")
    assert kube.wait_for("pods", "stubborn", NS, predicate=lambda p: p is None, timeout=30) is None
    assert time.monotonic() - t0 >= 3

    # Node loss: the node goes Unknown and its pods Ready=False (they stay Running, as with a dead kubelet).
    lost = seen[forever[1]][1]["spec"]["nodeName"]
    on_lost = [n for n, (ph, p) in seen.items() if ph == "Running" and p["spec"]["nodeName"] == lost and n != victim]
    assert on_lost
    lose_node(kube, lost)

    def lost_pods_not_ready() -> bool:
        pods = phases(kube)
        return all((condition(pods[n][1], "Ready") or {}).get("status") == "False" for n in on_lost)
    wait_until(lost_pods_not_ready, timeout=30, interval=0.5, what=f"the pods of lost node {lost} to go Ready=False")
    assert (condition(kube.get("nodes", lost), "Ready") or {}).get("status") == "Unknown"
    pods = phases(kube)
    assert all(pods[n][0] == "Running" for n in on_lost)

    # Heartbeats of the other nodes are real (lastHeartbeatTime moves on) and
    # spread over the period, not posted by all 100 nodes in one pass.
    other = next(n for n in NODES if n != lost)
    first = (condition(kube.get("nodes", other), "Ready") or {}).get("lastHeartbeatTime")
    wait_until(lambda: (condition(kube.get("nodes", other), "Ready") or {}).get("lastHeartbeatTime") != first,
               timeout=30, interval=0.5, what=f"a heartbeat of {other}")
    beats = {(condition(n, "Ready") or {}).get("lastHeartbeatTime") for n in kube.list("nodes") if n["metadata"]["name"] != lost}
    assert len(beats) >= 6, f"heartbeats in lockstep: {sorted(beats)}"
