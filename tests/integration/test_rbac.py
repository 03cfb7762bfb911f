"""RBAC equals use: the chart grants exactly the API calls the operator makes.

The chart's rendered ServiceAccount, (Cluster)Roles and bindings are created
in the stand-in, which enforces RBAC, and the operator runs with a token of
that ServiceAccount through a job's whole life (create, run, a preemption,
the fenced restart, success, delete) with S3 snapshots and a credentials
Secret, in each of the chart's two modes:

* no request of the operator is refused (401/403): the server decided, with
  the chart's rules; in namespaces mode every request stays inside the
  watched namespace;
* every (group, resource, verb) a rule grants was used at least once, so no
  rule grants a verb the operator never uses (``events patch``, used when an
  Event repeats, is proven by the denial test below);
* the only requests not covered by the chart are the discovery endpoints,
  which every authenticated user may read (``system:discovery``).

And a real denial: with ``pods create`` taken out of the chart's rules, the
operator is refused with the real 403 text, says so in one aggregated
Warning Event whose count grows, and never crashes.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster import control
from localcluster.kube import ApiError, Resource, wait_until

from tests.chart.render import RELEASE, RELEASE_NAMESPACE, operator_grants, render

from .helpers import TJ, events_of, job_manifest, pods_of, wait_phase, wait_status
from .identity import install_rbac, operator_command, operator_kubeconfig

pytestmark = pytest.mark.integration

SA = f"{RELEASE}-trainingjob-operator"
OPERATOR_AGENTS = ("trainingjob-operator/", "kopf/")
DISCOVERY = re.compile(r"^/(version|api|api/v1|apis|apis/[a-z0-9.-]+(/v[0-9a-z]+)?)/?$")

#: Granted, and needed, without a request of their own in a job's normal life:
#: events patch (a repeated Event: test_rbac_denied_create_is_reported_and_retried)
#: and update on trainingjobs/finalizers (checked by OwnerReferencesPermissionEnforcement
#: when a pod is created with blockOwnerDeletion: test_owner_references.py).
IMPLICIT = {("", "events", "patch"), ("trainingjob.dev", "trainingjobs/finalizers", "update")}

# Attempt 0 runs until it is preempted (fenced, SIGTERMed); attempt 1 succeeds.
CODE = "import os,time; time.sleep(30 if os.environ['TJ_ATTEMPT']=='0' else 1)"


def _operator_requests(log: Path, offset: int, t0: float, t1: float) -> list[dict[str, Any]]:
    with log.open("rb") as f:
        f.seek(offset)
        entries = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return [e for e in entries if e["user_agent"].startswith(OPERATOR_AGENTS) and t0 <= e["ts"] <= t1]


def _resource(e: dict[str, Any]) -> str:
    return e["resource"] + (f"/{e['subresource']}" if e.get("subresource") else "")


def _create_secret(kube, cluster, namespace: str) -> None:
    cluster.create_s3_secret(namespace)


def _snapshot_spec(cluster) -> dict[str, Any]:
    return {"uri": f"s3://{cluster.bucket}/rbac", "endpoint": cluster.s3_endpoint, "credentialsSecret": "s3-creds"}


def _run_life_of_a_job(kube, cluster, namespace: str, name: str) -> None:
    kube.create(TJ, job_manifest(name, namespace, CODE, nodes=2, snapshot=_snapshot_spec(cluster),
                                 recovery={"maxPreemptions": 5, "backoffSeconds": 1}), namespace=namespace)
    wait_status(kube, namespace, name, lambda s: s.get("phase") == "Running" and s.get("attempt") == 0,
                timeout=60, what="attempt 0 running")
    control.preempt(kube, namespace, f"{name}-0-1", grace_period=1)
    st = wait_phase(kube, namespace, name, "Succeeded", timeout=90)
    assert st["restarts"]["preemptions"] == 1 and st["attempt"] == 1
    # The snapshot listing ran with the Secret's credentials (no secret problem reported).
    assert not [c for c in st.get("conditions", []) if "Secret" in (c.get("message") or "")]
    kube.delete(TJ, name, namespace=namespace)
    # The next reconcile sees the job gone (GET -> 404) and forgets it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and kube.get_or_none(TJ, name, namespace=namespace) is not None:
        time.sleep(0.2)
    time.sleep(2.5)  # at least one resync pass over the deleted job (--resync-seconds 1)


def _check(requests: list[dict[str, Any]], grants, *, watched: str | None) -> set[tuple[str, str, str]]:
    """Assert every request is allowed; return the (group, resource, verb) triples used."""
    assert requests, "no request of the operator was recorded"
    used: set[tuple[str, str, str]] = set()
    denied = []
    for e in requests:
        if e["resource"] is None:
            assert e["method"] == "GET" and DISCOVERY.match(e["path"]), f"non-resource request {e['path']}"
            continue
        group, resource, verb, ns = e["api_group"] or "", _resource(e), e["verb"], e["namespace"]
        if watched is not None:
            assert ns == watched, f"namespaces mode: {verb} {resource} outside {watched!r}: {e['path']}"
        if not any(g.allows(verb, group, resource, ns) for g in grants):
            denied.append(f"{e['method']} {e['path']}?{e['query']} -> {verb} {group or 'core'}/{resource} ns={ns}")
        used.add((group, resource, verb))
    assert not denied, "requests the chart's RBAC would deny:\n" + "\n".join(sorted(set(denied)))
    return used


def _granted(grants) -> set[tuple[str, str, str]]:
    return {(grp, res, verb) for g in grants for grp in g.api_groups for res in g.resources for verb in g.verbs}


# Two functions, not a parametrized one: the conftest's namespace fixture turns
# a "[param]" test id into a name ending in "-", which the API server rejects.
@pytest.mark.timeout(240)
def test_rbac_cluster_wide(cluster, kube, namespace, start_operator, tmp_path):
    _operator_requests_equal_chart_rbac("cluster-wide", cluster, kube, namespace, start_operator, tmp_path)


@pytest.mark.timeout(240)
def test_rbac_namespaces(cluster, kube, namespace, start_operator, tmp_path):
    _operator_requests_equal_chart_rbac("namespaces", cluster, kube, namespace, start_operator, tmp_path)


def _operator_requests_equal_chart_rbac(mode, cluster, kube, namespace, start_operator, tmp_path):
    values = {"watchNamespaces": [namespace]} if mode == "namespaces" else {}
    objs = render(values, tmp_dir=tmp_path)
    grants = operator_grants(objs, SA, RELEASE_NAMESPACE)
    assert grants
    if mode == "namespaces":
        assert {g.namespace for g in grants} == {namespace}
    else:
        assert {g.namespace for g in grants} == {None}

    _create_secret(kube, cluster, namespace)
    # In namespaces mode a job in another namespace must be left alone (and its
    # Secret never read): the chart grants nothing there.
    other = None
    if mode == "namespaces":
        other = f"{namespace}-other"[:63]
        kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}})
        _create_secret(kube, cluster, other)
        kube.create(TJ, job_manifest("ignored", other, CODE, nodes=1, snapshot=_snapshot_spec(cluster)),
                    namespace=other)

    log = Path(cluster.state_dir) / "api-requests.jsonl"
    offset = log.stat().st_size
    t0 = time.time()
    args = ["--resync-seconds", "1"] + (["--namespace", namespace] if mode == "namespaces" else [])
    name = f"rbac-{mode}"
    with install_rbac(kube, objs, RELEASE_NAMESPACE):
        # Namespaces mode logs in through an exec credential plugin (Kopf and the operator's own client
        # both): every request below must still be the ServiceAccount's.
        kubeconfig = operator_kubeconfig(kube, cluster.api_url, RELEASE_NAMESPACE, SA, tmp_path / "operator.kubeconfig",
                                         exec_plugin=mode == "namespaces")
        start_operator(args, name=name, command=operator_command(kubeconfig))
        try:
            _run_life_of_a_job(kube, cluster, namespace, "life")
            if other:
                assert not (kube.get(TJ, "ignored", namespace=other).get("status") or {})
                assert pods_of(kube, other, "ignored") == []
        finally:
            cluster.stop_operator(name)  # the log is complete once the operator is gone
            if other:
                try:
                    kube.delete("namespaces", other)
                except ApiError:
                    pass
    requests = _operator_requests(log, offset, t0, time.time())
    _check_life(requests, grants, mode, namespace)


def _check_life(requests, grants, mode, namespace) -> None:
    agents = {e["user_agent"].split("/")[0] for e in requests}
    assert agents == {"trainingjob-operator", "kopf"}, agents

    refused = [f"{e['status']} {e['method']} {e['path']}" for e in requests if e["status"] in (401, 403)]
    assert not refused, "the API server refused the operator under the chart's RBAC:\n" + "\n".join(refused)
    assert {e["user"] for e in requests} == {f"system:serviceaccount:{RELEASE_NAMESPACE}:{SA}"}
    used = _check(requests, grants, watched=namespace if mode == "namespaces" else None)
    # Both ways: nothing granted that the operator did not use (events patch: see the denial test).
    unused = _granted(grants) - used - IMPLICIT
    assert not unused, f"rules grant verbs the operator never used: {sorted(unused)}"
    # The calls that matter, named: the Secret read with get only, nodes only cluster-wide.
    assert ("", "secrets", "get") in used
    assert {v for g, r, v in used if r == "secrets"} == {"get"}
    assert (("", "nodes", "watch") in used) == (mode == "cluster-wide")
    assert ("trainingjob.dev", "trainingjobs/status", "patch") in used
    assert {("", "pods", "create"), ("", "pods", "delete"), ("", "services", "delete")} <= used


def _without(objs, group: str, resource: str, verb: str):
    """The rendered chart with one verb taken out of every rule."""
    out = copy.deepcopy(objs)
    for o in out:
        for rule in o.get("rules") or []:
            if group in (rule.get("apiGroups") or []) and resource in (rule.get("resources") or []):
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    return out


@pytest.mark.timeout(120)
def test_rbac_denied_create_is_reported_and_retried(cluster, kube, namespace, start_operator, tmp_path):
    """A real denial: the chart's rules without ``pods create``."""
    objs = _without(render({}, tmp_dir=tmp_path), "", "pods", "create")
    log = Path(cluster.state_dir) / "api-requests.jsonl"
    offset = log.stat().st_size
    t0 = time.time()
    with install_rbac(kube, objs, RELEASE_NAMESPACE):
        kubeconfig = operator_kubeconfig(kube, cluster.api_url, RELEASE_NAMESPACE, SA, tmp_path / "operator.kubeconfig")
        op = start_operator(["--resync-seconds", "1"], name="rbac-denied", command=operator_command(kubeconfig))
        try:
            kube.create(TJ, job_manifest("denied", namespace, CODE, nodes=2), namespace=namespace)
            want = (f'pods is forbidden: User "system:serviceaccount:{RELEASE_NAMESPACE}:{SA}" cannot '
                    f'create resource "pods" in API group "" in the namespace "{namespace}"')

            def counted():
                evs = [e for e in events_of(kube, namespace, "denied") if e["reason"] == "CreateFailed"]
                return evs if evs and evs[0].get("count", 1) >= 3 else None

            evs = wait_until(counted, timeout=60, what="a CreateFailed Event counted 3 times")
            assert len(evs) == 1, evs  # aggregated, not one Event per retry
            assert want in evs[0]["message"], evs[0]["message"]
            st = kube.get(TJ, "denied", namespace=namespace).get("status") or {}
            assert st.get("phase") != "Failed"  # a 403 may pass later: retried, the job is not ended
            assert pods_of(kube, namespace, "denied") == []
            assert op.alive and "Traceback" not in op.log_text()
        finally:
            cluster.stop_operator("rbac-denied")
    requests = _operator_requests(log, offset, t0, time.time())
    denied = [e for e in requests if e["status"] == 403]
    assert denied and {(e["verb"], e["resource"]) for e in denied} == {("create", "pods")}
    assert any(e["verb"] == "patch" and e["resource"] == "events" and e["status"] == 200 for e in requests)
    kube.delete(TJ, "denied", namespace=namespace)


def _user_client(kube, cluster, namespace: str, name: str, cluster_role: str):
    from localcluster.kube import Client

    kube.create("serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
                namespace=namespace)
    kube.create(Resource("rbac.authorization.k8s.io/v1", "rolebindings"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}, namespace=namespace)
    got = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body={"spec": {}})
    return Client(cluster.api_url, token=got["status"]["token"])


@pytest.mark.timeout(60)
def test_chart_user_roles_let_a_namespace_admin_create_trainingjobs(cluster, kube, namespace, tmp_path):
    """The chart's user ClusterRoles are aggregated into admin/edit/view by an API server that enforces RBAC."""
    with install_rbac(kube, render({}, tmp_dir=tmp_path), RELEASE_NAMESPACE):
        admin = _user_client(kube, cluster, namespace, "alice", "admin")
        viewer = _user_client(kube, cluster, namespace, "victor", "view")
        admin.create(TJ, job_manifest("mine", namespace, CODE, nodes=1, suspend=True), namespace=namespace)
        admin.patch(TJ, "mine", {"spec": {"suspend": True}}, namespace=namespace)
        assert [j["metadata"]["name"] for j in viewer.list(TJ, namespace=namespace)] == ["mine"]
        with pytest.raises(ApiError) as err:
            viewer.delete(TJ, "mine", namespace=namespace)
        assert err.value.status == 403 and "cannot delete resource" in str(err.value)
        with pytest.raises(ApiError) as err:  # the status is the operator's
            admin.patch(TJ, "mine", {"status": {"phase": "Succeeded"}}, namespace=namespace, subresource="status")
        assert err.value.status == 403
        with pytest.raises(ApiError) as err:  # admin of this namespace only
            admin.list(TJ, namespace="default")
        assert err.value.status == 403
        admin.delete(TJ, "mine", namespace=namespace)
