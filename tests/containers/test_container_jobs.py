"""Issue 11 evidence: TrainingJobs whose pods run from the project's trainer image on container nodes."""

from __future__ import annotations

import pytest

from tests.integration.helpers import TJ, job_manifest, wait_phase

pytestmark = [pytest.mark.slow]


def test_issue11_evidence_memory_limit_exceeded_is_oomkilled_and_a_failure(podman_cluster, pkube, pns, images):
    """A container allocating past resources.limits.memory is OOM-killed by its cgroup (exit 137)."""
    op = podman_cluster.start_operator(["--resync-seconds", "1"], name="operator-oom")
    try:
        body = job_manifest("oom", pns, "b = bytearray(1 << 30)", nodes=1, image=images["trainer"],
                            resources={"limits": {"memory": "96Mi"}},
                            recovery={"maxFailures": 0})
        body["spec"]["command"] = ["python", "-c", "b = bytearray(1 << 30)"]
        pkube.create(TJ, body, namespace=pns)
        st = wait_phase(pkube, pns, "oom", "Failed", timeout=120)
    finally:
        podman_cluster.stop_operator("operator-oom")
    # A failure, not a preemption: with maxFailures 0 the job fails at once.
    assert st["restarts"] == {"preemptions": 0, "failures": 0}, st
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "FailureBudgetExhausted" or "maxFailures" in ready["message"], ready
    assert "OOMKilled" in st["lastDisruption"]["message"], st["lastDisruption"]
    assert op.pid
