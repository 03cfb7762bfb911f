"""The rendezvous Service (issue 9, defect 9): repaired when deleted, selecting the job's uid."""

from __future__ import annotations

import pytest

from trainingjob_trainer import contract

from .helpers import TJ, events_of, job_manifest, wait_status

pytestmark = pytest.mark.integration


def test_defect9_deleted_rendezvous_service_is_recreated_with_a_uid_selector(kube, namespace, start_operator):
    start_operator(["--resync-seconds", "1"])
    kube.create(TJ, job_manifest("svc", namespace, "import time; time.sleep(600)", nodes=2), namespace=namespace)
    wait_status(kube, namespace, "svc", lambda s: s.get("phase") == "Running", timeout=60, what="Running")
    uid = kube.get(TJ, "svc", namespace=namespace)["metadata"]["uid"]
    old = kube.get("services", "svc-0", namespace)
    assert old["spec"]["selector"][contract.LABEL_JOB_UID] == uid
    kube.delete("services", "svc-0", namespace)
    new = kube.wait_for("services", "svc-0", namespace, timeout=30,
                        predicate=lambda s: bool(s) and s["metadata"]["uid"] != old["metadata"]["uid"])
    assert new["spec"]["selector"] == old["spec"]["selector"]
    assert any(e["reason"] == "ServiceRecreated" for e in events_of(kube, namespace, "svc"))
    st = wait_status(kube, namespace, "svc", lambda s: True)
    assert st["phase"] == "Running" and st["attempt"] == 0
    kube.delete(TJ, "svc", namespace=namespace)
