"""A real `kopf run` operator process against the local cluster stand-in.

Pods are run by the node agent as real local processes (short Python
commands, no torch). Each test uses its own namespace and operator process.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from localcluster.kube import ApiError
from trainingjob_operator.classify import parse_time

from .helpers import TJ, Recorder, events_of, job_manifest, pods_of, status, wait_phase, wait_status

pytestmark = pytest.mark.integration


def test_three_node_job_pending_running_succeeded(kube, namespace, start_operator):
    code = ("import os,time; time.sleep(2); "
            "assert os.environ['PET_NNODES']=='3' and os.environ['TJ_ATTEMPT']=='0'; "
            "print('rank', os.environ['PET_NODE_RANK'])")
    start_operator()
    with Recorder(kube, namespace, "hello") as rec:
        kube.create(TJ, job_manifest("hello", namespace, code, nodes=3), namespace=namespace)
        st = wait_phase(kube, namespace, "hello", "Succeeded", timeout=60)
    assert rec.phases[0] == "Pending" and "Running" in rec.phases and rec.phases[-1] == "Succeeded"
    assert rec.phases.index("Pending") < rec.phases.index("Running") < rec.phases.index("Succeeded")
    assert st["workers"]["desired"] == 3 and st["workers"]["succeeded"] == 3
    assert st["attempt"] == 0 and st["restarts"] == {"preemptions": 0, "failures": 0}
    assert st.get("completionTime") and st.get("startTime")
    succeeded = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "AllWorkersSucceeded"
    pods = pods_of(kube, namespace, "hello")
    # cleanPodPolicy Running (default): finished pods are kept for their logs.
    assert sorted(p["metadata"]["name"] for p in pods) == ["hello-0-0", "hello-0-1", "hello-0-2"]
    pod0 = next(p for p in pods if p["metadata"]["name"] == "hello-0-0")
    assert pod0["spec"]["restartPolicy"] == "Never"
    assert pod0["spec"]["automountServiceAccountToken"] is False
    assert pod0["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    env = {e["name"]: e.get("value") for e in pod0["spec"]["containers"][0]["env"]}
    assert env["PET_RDZV_ENDPOINT"] == f"hello-0-0.hello-0.{namespace}.svc:29400"
    assert env["PET_MAX_RESTARTS"] == "0" and env["PET_RDZV_BACKEND"] == "c10d"
    reasons = [e["reason"] for e in events_of(kube, namespace, "hello")]
    assert "GangCreated" in reasons and "AllWorkersSucceeded" in reasons
    kube.delete(TJ, "hello", namespace=namespace)


def test_failing_pod_fences_gang_restarts_with_backoff_then_fails(kube, namespace, start_operator):
    # Rank 1 fails after 1 s in every attempt; the others would run for 60 s.
    code = ("import os,sys,time; r=os.environ['PET_NODE_RANK']; time.sleep(1 if r=='1' else 60); "
            "sys.exit(3 if r=='1' else 0)")
    start_operator()
    spec = {"recovery": {"maxFailures": 1, "backoffSeconds": 2, "maxBackoffSeconds": 10, "failureSettleSeconds": 1}}
    with Recorder(kube, namespace, "crashy") as rec:
        kube.create(TJ, job_manifest("crashy", namespace, code, nodes=3, **spec), namespace=namespace)
        first_fail = wait_status(kube, namespace, "crashy", lambda s: s.get("restarts", {}).get("failures") == 1 and "nextRestartTime" in s,
                                 timeout=60, what="first failure")
        st = wait_phase(kube, namespace, "crashy", "Failed", timeout=90)
    assert first_fail["reason"] in ("WorkerFailed", "BackoffBeforeRestart", "FencingPreviousAttempt")
    assert st["reason"] == "FailureBudgetExhausted"
    assert "crashy-1-1" in st["message"] and "exited with code 3" in st["message"]
    assert st["restarts"] == {"preemptions": 0, "failures": 1}
    assert st["lastDisruption"]["exitCode"] == 3 and st["lastDisruption"]["kind"] == "Failure"
    # Fencing: attempt 1's pods appeared only after every pod of attempt 0 was gone,
    # and not before the 2 s backoff.
    gone0 = rec.last("crashy-0-", "gone")
    seen1 = rec.first("crashy-1-", "seen")
    assert gone0 is not None and seen1 is not None and seen1 > gone0
    backoff_end = parse_time(first_fail["nextRestartTime"])
    decided = parse_time(first_fail["lastDisruption"]["at"])
    assert (backoff_end - decided).total_seconds() >= 2
    created = [parse_time(p["metadata"]["creationTimestamp"]) for p in pods_of(kube, namespace, "crashy")
               if p["metadata"]["name"].startswith("crashy-1-")]
    assert created and min(created) >= backoff_end
    # The failed job's running pods are deleted (cleanPodPolicy Running).
    wait = time.monotonic() + 30
    while time.monotonic() < wait:
        running = [p for p in pods_of(kube, namespace, "crashy") if p["status"].get("phase") == "Running"]
        if not running:
            break
        time.sleep(0.3)
    assert not running
    reasons = [e["reason"] for e in events_of(kube, namespace, "crashy")]
    assert "WorkerFailed" in reasons and "FailureBudgetExhausted" in reasons
    kube.delete(TJ, "crashy", namespace=namespace)


def test_suspend_and_resume(kube, namespace, start_operator):
    code = "import time; time.sleep(60)"
    start_operator()
    kube.create(TJ, job_manifest("pausable", namespace, code, nodes=2), namespace=namespace)
    wait_phase(kube, namespace, "pausable", "Running", timeout=60)
    kube.patch(TJ, "pausable", {"spec": {"suspend": True}}, namespace=namespace)
    st = wait_phase(kube, namespace, "pausable", "Suspended", timeout=30)
    deadline = time.monotonic() + 30
    while pods_of(kube, namespace, "pausable") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pods_of(kube, namespace, "pausable") == []
    assert next(c for c in status(kube, namespace, "pausable")["conditions"] if c["type"] == "Suspended")["status"] == "True"
    kube.patch(TJ, "pausable", {"spec": {"suspend": False}}, namespace=namespace)
    st = wait_phase(kube, namespace, "pausable", "Running", timeout=60)
    assert st["attempt"] == 1 and st["restarts"] == {"preemptions": 0, "failures": 0}
    assert sorted(p["metadata"]["name"] for p in pods_of(kube, namespace, "pausable")) == ["pausable-1-0", "pausable-1-1"]
    kube.delete(TJ, "pausable", namespace=namespace)


def test_delete_removes_everything_it_created(kube, namespace, start_operator):
    start_operator()
    kube.create(TJ, job_manifest("doomed", namespace, "import time; time.sleep(60)", nodes=2), namespace=namespace)
    wait_phase(kube, namespace, "doomed", "Running", timeout=60)
    assert kube.list("services", namespace=namespace, label_selector="trainingjob.dev/job-name=doomed")
    kube.delete(TJ, "doomed", namespace=namespace)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = pods_of(kube, namespace, "doomed") + kube.list(
            "services", namespace=namespace, label_selector="trainingjob.dev/job-name=doomed")
        if not left:
            break
        time.sleep(0.2)
    assert left == []
    with pytest.raises(ApiError):
        kube.get(TJ, "doomed", namespace=namespace)


def test_operator_sigkilled_mid_creation_ends_with_exactly_one_gang(kube, namespace, start_operator, cluster):
    nodes = 8
    op = start_operator()
    kube.create(TJ, job_manifest("solo", namespace, "import time; time.sleep(4)", nodes=nodes), namespace=namespace)
    # SIGKILL as soon as the first pod exists: the gang is only partly created.
    deadline = time.monotonic() + 30
    while not pods_of(kube, namespace, "solo") and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(op.pid, signal.SIGKILL)
    partial = len(pods_of(kube, namespace, "solo"))
    assert 1 <= partial < nodes, "the operator was not killed mid-creation"
    cluster.stop_operator()
    start_operator(name="operator-2")
    st = wait_phase(kube, namespace, "solo", "Succeeded", timeout=90)
    names = sorted(p["metadata"]["name"] for p in pods_of(kube, namespace, "solo"))
    assert names == sorted(f"solo-0-{r}" for r in range(nodes))
    assert st["attempt"] == 0 and st["restarts"] == {"preemptions": 0, "failures": 0}
    kube.delete(TJ, "solo", namespace=namespace)


def test_lost_node_is_a_preemption_and_its_pods_are_force_deleted(kube, namespace, start_operator):
    from localcluster import control

    start_operator(["--resync-seconds", "1"])
    spec = {"recovery": {"nodeNotReadySeconds": 1, "failureSettleSeconds": 30, "maxFailures": 0}}
    kube.create(TJ, job_manifest("island", namespace, "import time; time.sleep(60)", nodes=2, **spec),
                namespace=namespace)
    wait_phase(kube, namespace, "island", "Running", timeout=60)
    node = kube.get("pods", "island-0-1", namespace=namespace)["spec"]["nodeName"]
    control.lose_node(kube, node)
    try:
        st = wait_status(kube, namespace, "island", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running",
                         timeout=60, what="attempt 1 running")
        assert st["restarts"] == {"preemptions": 1, "failures": 0}
        assert st["lastDisruption"]["reason"] == "NodeLost" and st["lastDisruption"]["node"] == node
        names = sorted(p["metadata"]["name"] for p in pods_of(kube, namespace, "island"))
        assert names == ["island-1-0", "island-1-1"]  # the lost node's pod was force-deleted
        assert all(p["spec"]["nodeName"] != node for p in pods_of(kube, namespace, "island"))
    finally:
        control.restore_node(kube, node)
    kube.delete(TJ, "island", namespace=namespace)
