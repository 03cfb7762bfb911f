"""Restart budgets: failures and preemptions are counted apart, each with its own end."""

from __future__ import annotations

import pytest

from localcluster import control
from trainingjob_operator.classify import parse_time

from .helpers import TJ, events_of, job_manifest, wait_phase, wait_status

pytestmark = pytest.mark.integration


def test_always_crashing_job_fails_after_max_failures_with_backoff(kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    spec = {"recovery": {"maxFailures": 2, "backoffSeconds": 1, "maxBackoffSeconds": 60, "failureSettleSeconds": 1}}
    kube.create(TJ, job_manifest("crash", namespace, "import sys; sys.exit(7)", nodes=2, **spec), namespace=namespace)
    backoffs = []
    for n in (1, 2):
        st = wait_status(kube, namespace, "crash",
                         lambda s, n=n: s.get("restarts", {}).get("failures") == n and "nextRestartTime" in s,
                         timeout=60, what=f"failure {n}")
        backoffs.append((parse_time(st["nextRestartTime"]) - parse_time(st["lastDisruption"]["at"])).total_seconds())
    st = wait_phase(kube, namespace, "crash", "Failed", timeout=60)
    assert st["reason"] == "FailureBudgetExhausted" and "maxFailures=2" in st["message"]
    assert st["restarts"] == {"preemptions": 0, "failures": 2}
    assert st["attempt"] == 2 and "exited with code 7" in st["message"]
    # exponential: 1 s then 2 s (second-resolution timestamps, rounded up)
    assert 1 <= backoffs[0] <= 2 and 2 <= backoffs[1] <= 3
    assert [e["reason"] for e in events_of(kube, namespace, "crash")].count("WorkerFailed") == 2
    kube.delete(TJ, "crash", namespace=namespace)


def test_preemption_budget_exhausted_has_its_own_reason(kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    spec = {"recovery": {"maxPreemptions": 1, "maxFailures": 5}, "terminationGracePeriodSeconds": 2}
    kube.create(TJ, job_manifest("spot", namespace, "import time; time.sleep(120)", nodes=2, **spec),
                namespace=namespace)
    for attempt in (0, 1):
        wait_status(kube, namespace, "spot", lambda s, a=attempt: s.get("attempt") == a and s.get("phase") == "Running",
                    timeout=60, what=f"attempt {attempt} running")
        control.preempt(kube, namespace, f"spot-{attempt}-0", reason="PreemptionByScheduler")
    st = wait_phase(kube, namespace, "spot", "Failed", timeout=60)
    assert st["reason"] == "PreemptionBudgetExhausted" and "maxPreemptions=1" in st["message"]
    assert st["restarts"] == {"preemptions": 1, "failures": 0}
    assert st["lastDisruption"]["kind"] == "Preemption"
    kube.delete(TJ, "spot", namespace=namespace)
