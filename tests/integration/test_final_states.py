"""Defect 13: a pod's final state is read from the watch, not from a cache it has already left.

The kubelet writes a pod's final status (exit code, termination message with
the step the rank reached) and deletes the pod right after. Here the test
plays that kubelet for a gang the node agent does not run (its own
``schedulerName`` and a Node of its own): each pod is bound and reported
Running; then one is preempted (``DisruptionTarget``); the operator fences the
gang; the "kubelet" answers each graceful deletion with the final status and
the grace-0 DELETE back to back. ``lastDisruption.step`` and the lost work
must still be the step the ranks reported (no snapshot: all of it is lost).
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse

import pytest

from localcluster.kube import ApiError, wait_until
from trainingjob_trainer import contract

from .helpers import TJ, job_manifest, pods_of, wait_status

pytestmark = pytest.mark.integration

NODE = "kubelet-test-0"
SCHEDULER = "final-state-test"
STEP = 7


def _node() -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "lastHeartbeatTime": now, "lastTransitionTime": now}],
                       "capacity": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                       "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"}}}


def _run(kube, namespace: str, pod: dict) -> None:
    name = pod["metadata"]["name"]
    if not pod["spec"].get("nodeName"):
        kube.create("pods", {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}},
                    namespace=namespace, subresource="binding")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kube.patch("pods", name, {"status": {
        "phase": "Running", "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [{"name": contract.CONTAINER_NAME, "ready": True, "started": True, "restartCount": 0,
                               "image": "x", "imageID": "", "state": {"running": {"startedAt": now}}}]}},
        namespace=namespace, subresource="status", patch_type="strategic")


def _http(method: str, path: str, body: dict, ctype: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _exit_and_vanish(api_url: str, namespace: str, pods: list[dict]) -> None:
    """What the kubelet does at the end of a graceful deletion: final status, then DELETE at once.

    The requests go out pipelined on one connection (no wait for an answer
    in between), so the final status lives in the API for well under a
    millisecond, as with a real kubelet (0.1 to 30 ms were measured).
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    message = contract.format_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_PREEMPTED, step=STEP, message="SIGTERM at a step boundary"))
    wire = b""
    for pod in pods:
        path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
        final = {"status": {"phase": "Failed", "containerStatuses": [{
            "name": contract.CONTAINER_NAME, "ready": False, "started": False, "restartCount": 0, "image": "x",
            "imageID": "", "state": {"terminated": {
                "exitCode": contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, "reason": "Error", "message": message,
                "startedAt": now, "finishedAt": now}}}]}}
        wire += _http("PATCH", f"{path}/status", final, "application/strategic-merge-patch+json")
        wire += _http("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                       "preconditions": {"uid": pod["metadata"]["uid"]}}, "application/json")
    u = urllib.parse.urlsplit(api_url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(wire)
        got = b""
        while got.count(b"HTTP/1.1 ") < 2 * len(pods):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", got)
    assert statuses == [b"200"] * (2 * len(pods)), got[:2000]


@pytest.fixture
def test_node(kube):
    """The test's own Node, removed afterwards: the cluster is shared by the session's tests."""
    try:
        kube.create("nodes", _node())
    except ApiError as e:
        if e.status != 409:
            raise
    yield NODE
    kube.delete_if_exists("nodes", NODE)


@pytest.mark.timeout(120)
def test_defect13_final_state_of_a_pod_deleted_right_after_is_kept(cluster, kube, namespace, start_operator, test_node):
    start_operator(["--resync-seconds", "1"])
    spec = {"podTemplate": {"spec": {"schedulerName": SCHEDULER}}, "recovery": {"maxPreemptions": 3}}
    kube.create(TJ, job_manifest("fs", namespace, "unused", nodes=2, **spec), namespace=namespace)
    attempt0 = wait_until(lambda: [p for p in pods_of(kube, namespace, "fs") if p["metadata"]["name"].startswith("fs-0-")
                                   ] if len(pods_of(kube, namespace, "fs")) == 2 else None, timeout=30,
                          what="attempt 0 created")
    for p in attempt0:
        _run(kube, namespace, p)
    wait_status(kube, namespace, "fs", lambda s: s.get("phase") == "Running", timeout=30, what="Running")

    # The scheduler preempts rank 1: DisruptionTarget, then (the operator) fences the gang.
    kube.patch("pods", "fs-0-1", {"status": {"conditions": [{
        "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
        "message": "preempted by a higher-priority pod"}]}}, namespace=namespace, subresource="status",
        patch_type="strategic")
    wait_status(kube, namespace, "fs", lambda s: s.get("attempt") == 1, timeout=30, what="attempt 1 decided")
    deleting = wait_until(lambda: [p for p in pods_of(kube, namespace, "fs") if p["metadata"].get("deletionTimestamp")
                                   and p["metadata"]["name"].startswith("fs-0-")] or None, timeout=30,
                          what="the fence's graceful deletes")
    wait_until(lambda: len([p for p in pods_of(kube, namespace, "fs") if p["metadata"].get("deletionTimestamp")]) == 2,
               timeout=30, what="both pods being deleted")
    _exit_and_vanish(cluster.api_url, namespace,
                     [p for p in pods_of(kube, namespace, "fs") if p["metadata"]["name"].startswith("fs-0-")])
    assert deleting

    st = wait_status(kube, namespace, "fs", lambda s: s.get("gangCreated") and s.get("attempt") == 1,
                     timeout=30, what="attempt 1 created")
    last = st["lastDisruption"]
    assert last["reason"] == "PreemptionByScheduler" and last["attempt"] == 0
    assert last.get("step") == STEP, last
    assert st["lostWork"]["steps"] == STEP, st["lostWork"]
    kube.delete(TJ, "fs", namespace=namespace)
