"""Defect 7: ``blockOwnerDeletion: true`` needs ``update`` on ``trainingjobs/finalizers``.

An API server stand-in of its own, with the OwnerReferencesPermissionEnforcement
admission plugin on (as OpenShift runs it) and RBAC enforced; the chart's
CRD and rendered RBAC installed; the operator runs as the chart's
ServiceAccount. Its pods and Service (each with an ownerReference that sets
blockOwnerDeletion) are created; without the chart's finalizers rule every
create is a 403.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from localcluster.apiserver import start_in_thread
from localcluster.kube import Client, wait_until
from tests.chart.render import CHART, RELEASE, RELEASE_NAMESPACE, render

from .helpers import TJ, events_of, job_manifest, pods_of
from .identity import apply_rbac, operator_command, operator_kubeconfig

pytestmark = pytest.mark.integration

SA = f"{RELEASE}-trainingjob-operator"


@pytest.fixture
def strict_api(tmp_path):
    server = start_in_thread(tmp_path / "api", admission_plugins={"OwnerReferencesPermissionEnforcement"})
    kube = Client(server.url)
    crd = yaml.safe_load((CHART / "crds" / "trainingjobs.yaml").read_text())
    kube.create("customresourcedefinitions", crd)
    wait_until(lambda: kube.request("GET", "/apis/trainingjob.dev/v1alpha1"), timeout=10, what="CRD served")
    try:
        yield server, kube
    finally:
        server.stop()


def _run(strict_api, tmp_path, start_operator, objs, name: str):
    server, kube = strict_api
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    apply_rbac(kube, objs, RELEASE_NAMESPACE)  # this API server is the test's own: nothing to clean up
    kc = operator_kubeconfig(kube, server.url, RELEASE_NAMESPACE, SA, tmp_path / "op.kubeconfig")
    start_operator(["--resync-seconds", "1"], name=name, command=operator_command(kc))
    kube.create(TJ, job_manifest("owned", "team", "print(1)", nodes=2), namespace="team")
    return kube


@pytest.mark.timeout(60)
def test_defect7_chart_grants_finalizers_so_owned_creates_pass(strict_api, tmp_path, start_operator):
    kube = _run(strict_api, tmp_path, start_operator, render({}, tmp_dir=tmp_path), "owner-refs")
    pods = wait_until(lambda: pods_of(kube, "team", "owned") if len(pods_of(kube, "team", "owned")) == 2 else None,
                      timeout=30, what="the gang's pods created")
    assert all(r["blockOwnerDeletion"] for p in pods for r in p["metadata"]["ownerReferences"])
    assert kube.list("services", namespace="team")
    assert not [e for e in events_of(kube, "team", "owned") if e["reason"] == "CreateFailed"]


@pytest.mark.timeout(60)
def test_defect7_without_the_finalizers_rule_creates_are_refused(strict_api, tmp_path, start_operator):
    """The stand-in is strict: the same chart without that one rule cannot create anything."""
    objs = copy.deepcopy(render({}, tmp_dir=tmp_path))
    for o in objs:
        if o.get("rules"):
            o["rules"] = [r for r in o["rules"] if "trainingjobs/finalizers" not in (r.get("resources") or [])]
    kube = _run(strict_api, tmp_path, start_operator, objs, "owner-refs-missing")
    ev = wait_until(lambda: [e for e in events_of(kube, "team", "owned") if e["reason"] == "CreateFailed"],
                    timeout=30, what="a CreateFailed Event")
    assert "cannot set blockOwnerDeletion" in ev[0]["message"] and "trainingjobs/finalizers" in ev[0]["message"]
    assert pods_of(kube, "team", "owned") == []
