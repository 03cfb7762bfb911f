"""Fencing that cannot finish (issue 9, defect 8): a fenced pod on a lost node stays
Terminating on the strict stand-in; after fenceTimeoutSeconds the operator forces it."""

from __future__ import annotations

import pytest

from localcluster import control

from .helpers import TJ, job_manifest, pods_of, wait_status

pytestmark = pytest.mark.integration


def test_defect8_pod_stuck_terminating_on_a_lost_node_is_forced_after_fence_timeout(
        kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    # nodeNotReadySeconds is long: only the fence timeout can unblock the next attempt.
    spec = {"terminationGracePeriodSeconds": 2,
            "recovery": {"nodeNotReadySeconds": 3600, "fenceTimeoutSeconds": 1, "maxPreemptions": 3}}
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    kube.create(TJ, job_manifest("fence", namespace, code, nodes=2, **spec), namespace=namespace)
    wait_status(kube, namespace, "fence", lambda s: s.get("phase") == "Running", timeout=60, what="Running")
    node = kube.get("pods", "fence-0-1", namespace=namespace)["spec"]["nodeName"]
    control.lose_node(kube, node)
    try:
        # The other rank is preempted: the attempt ends, both pods are deleted gracefully,
        # and the one on the lost node can never finish terminating by itself.
        control.preempt(kube, namespace, "fence-0-0", reason="PreemptionByScheduler", message="test")
        st = wait_status(kube, namespace, "fence", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running",
                         timeout=90, what="attempt 1 running")
        assert st["restarts"] == {"preemptions": 1, "failures": 0}
        assert not [p for p in pods_of(kube, namespace, "fence") if p["metadata"]["name"].startswith("fence-0-")]
    finally:
        control.restore_node(kube, node)
    kube.delete(TJ, "fence", namespace=namespace)


def test_defect10_running_job_stays_running_while_its_lost_node_is_judged(kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    spec = {"terminationGracePeriodSeconds": 2, "recovery": {"nodeNotReadySeconds": 3600}}
    kube.create(TJ, job_manifest("judged", namespace, "import time; time.sleep(600)", nodes=2, **spec),
                namespace=namespace)
    wait_status(kube, namespace, "judged", lambda s: s.get("phase") == "Running", timeout=60, what="Running")
    node = kube.get("pods", "judged-0-1", namespace=namespace)["spec"]["nodeName"]
    phases = []
    control.lose_node(kube, node)
    try:
        # The node lifecycle controller marks the node NotReady and its pod Ready=False.
        kube.wait_for("pods", "judged-0-1", namespace, timeout=30,
                      predicate=lambda p: any(c.get("type") == "Ready" and c.get("status") == "False"
                                              for c in (p or {}).get("status", {}).get("conditions", [])))
        st = wait_status(kube, namespace, "judged",
                         lambda s: phases.append(s.get("phase")) or s.get("workers", {}).get("ready") == 1,
                         timeout=30, what="the unready worker counted")
        assert st["phase"] == "Running" and st["reason"] == "NodeNotReady" and node in st["message"]
        assert set(phases) == {"Running"}, phases
    finally:
        control.restore_node(kube, node)
    kube.delete(TJ, "judged", namespace=namespace)
