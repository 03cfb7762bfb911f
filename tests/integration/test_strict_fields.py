"""Defect 14: pods are created with ``fieldValidation=Strict``.

``securityContext.privileged`` exists on containers, not on pods: in
``podTemplate.spec.securityContext`` it was dropped by the API server and the
job ran unprivileged without a word. With Strict the API server refuses the
pod (400, as the stand-in does now like the real server) and the job ends
``InvalidSpec`` with the server's message, through the create-refusal path.
"""

from __future__ import annotations

import pytest

from .helpers import TJ, events_of, job_manifest, pods_of, wait_phase

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
def test_defect14_unknown_pod_field_ends_the_job_invalid_spec(kube, namespace, start_operator):
    start_operator()
    spec = {"podTemplate": {"spec": {"securityContext": {"privileged": True}}}}
    kube.create(TJ, job_manifest("priv", namespace, "import time; time.sleep(60)", nodes=2, **spec),
                namespace=namespace)
    st = wait_phase(kube, namespace, "priv", "Failed", timeout=30)
    assert st["reason"] == "InvalidSpec"
    assert 'strict decoding error: unknown field "spec.securityContext.privileged"' in st["message"], st["message"]
    assert pods_of(kube, namespace, "priv") == []
    warnings = [e for e in events_of(kube, namespace, "priv") if e["reason"] == "InvalidSpec"]
    assert len(warnings) == 1 and "privileged" in warnings[0]["message"]
    kube.delete(TJ, "priv", namespace=namespace)
