"""Waiting containers (issue 9, defect 4) on the stand-in's strict image pulls."""

from __future__ import annotations

import pytest

from localcluster.imageref import UNPULLABLE_REGISTRY

from .helpers import TJ, events_of, job_manifest, wait_phase, wait_status

pytestmark = pytest.mark.integration


def test_defect4_image_pull_errors_surface_and_an_invalid_image_fails_after_startup_timeout(
        kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    missing = job_manifest("missing", namespace, "print(1)", nodes=2, image=f"{UNPULLABLE_REGISTRY}acme/trainer:404")
    invalid = job_manifest("invalid", namespace, "print(1)", nodes=2, image="Acme/Trainer:1",
                           recovery={"startupTimeoutSeconds": 10})
    kube.create(TJ, missing, namespace=namespace)
    kube.create(TJ, invalid, namespace=namespace)
    st = wait_status(kube, namespace, "missing", lambda s: s.get("reason") == "ImagePullBackOff", timeout=60,
                     what="ImagePullBackOff in status")
    assert st["phase"] == "Pending" and f"{UNPULLABLE_REGISTRY}acme/trainer:404" in st["message"]
    reasons = {e["reason"] for e in events_of(kube, namespace, "missing")}
    assert "ImagePullBackOff" in reasons
    st = wait_status(kube, namespace, "invalid", lambda s: s.get("reason") == "InvalidImageName", timeout=60,
                     what="InvalidImageName in status")
    assert st["phase"] == "Pending"
    st = wait_phase(kube, namespace, "invalid", "Failed", timeout=60)
    assert st["reason"] == "InvalidImageName" and "invalid reference format" in st["message"]
    assert "startupTimeoutSeconds=10" in st["message"]
    assert st["restarts"] == {"preemptions": 0, "failures": 0}
    # The pull errors are not permanent: that job is still waiting, not failed.
    assert wait_status(kube, namespace, "missing", lambda s: True)["phase"] == "Pending"
    for name in ("missing", "invalid"):
        kube.delete(TJ, name, namespace=namespace)
