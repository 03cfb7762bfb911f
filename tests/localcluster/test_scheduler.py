"""The stand-in scheduler's filters (issue 9, defect 3): as strict as kube-scheduler's."""

from __future__ import annotations

from decimal import Decimal

import pytest

from localcluster import scheduler


def node(name="n1", *, alloc=None, labels=None, taints=None, unschedulable=False):
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": taints or [], **({"unschedulable": True} if unschedulable else {})},
            "status": {"allocatable": alloc or {"cpu": "4", "memory": "8Gi", "pods": "110"}}}


def pod(requests=None, limits=None, **spec):
    res = {}
    if requests:
        res["requests"] = requests
    if limits:
        res["limits"] = limits
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": res}], **spec}}


@pytest.mark.parametrize("q,v", [("500m", Decimal("0.5")), ("2", 2), ("1Gi", 2 ** 30), ("1k", 1000), (3, 3),
                                 ("1.5Gi", Decimal("1.5") * 2 ** 30), ("1e3", 1000)])
def test_defect3_quantities(q, v):
    assert scheduler.parse_quantity(q) == v


def test_defect3_requests_default_to_limits_and_sum():
    p = pod(limits={"nvidia.com/gpu": "2", "cpu": "1"}, requests={"cpu": "500m"})
    assert scheduler.pod_requests(p) == {"nvidia.com/gpu": 2, "cpu": Decimal("0.5")}


def test_defect3_insufficient_resources_name_each_resource():
    p = pod(limits={"nvidia.com/gpu": "1", "cpu": "8"})
    assert scheduler.filter_node(p, node(), {}) == ["Insufficient cpu", "Insufficient nvidia.com/gpu"]
    gpu = node(alloc={"cpu": "16", "nvidia.com/gpu": "1"})
    assert scheduler.filter_node(p, gpu, {}) == []
    assert scheduler.filter_node(p, gpu, {"nvidia.com/gpu": Decimal(1)}) == ["Insufficient nvidia.com/gpu"]


def test_defect3_taints_and_tolerations():
    t = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}
    assert scheduler.filter_node(pod(), node(taints=[t]), {}) == ["node(s) had untolerated taint {gpu: a100}"]
    for tol in ({"key": "gpu", "operator": "Equal", "value": "a100"}, {"key": "gpu", "operator": "Exists"},
                {"operator": "Exists"}, {"key": "gpu", "value": "a100", "effect": "NoSchedule"}):
        assert scheduler.filter_node(pod(tolerations=[tol]), node(taints=[t]), {}) == [], tol
    assert scheduler.filter_node(pod(tolerations=[{"key": "gpu", "value": "h100"}]), node(taints=[t]), {})
    assert scheduler.filter_node(pod(tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoExecute"}]),
                                 node(taints=[t]), {})
    assert scheduler.filter_node(pod(), node(taints=[{**t, "effect": "PreferNoSchedule"}]), {}) == []
    assert scheduler.filter_node(pod(), node(unschedulable=True), {}) == ["node(s) were unschedulable"]


def test_defect3_node_selector_and_required_affinity():
    n = node(labels={"pool": "gpu", "gen": "5"})
    assert scheduler.filter_node(pod(nodeSelector={"pool": "gpu"}), n, {}) == []
    assert scheduler.filter_node(pod(nodeSelector={"pool": "cpu"}), n, {}) == [scheduler.MSG_AFFINITY]

    def aff(*terms):
        return pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": list(terms)}}})

    expr = lambda k, op, *v: {"matchExpressions": [{"key": k, "operator": op, "values": list(v)}]}  # noqa: E731
    assert scheduler.filter_node(aff(expr("pool", "In", "gpu", "x")), n, {}) == []
    assert scheduler.filter_node(aff(expr("pool", "NotIn", "gpu")), n, {}) == [scheduler.MSG_AFFINITY]
    assert scheduler.filter_node(aff(expr("gen", "Gt", "4")), n, {}) == []
    assert scheduler.filter_node(aff(expr("gen", "Lt", "4")), n, {}) == [scheduler.MSG_AFFINITY]
    assert scheduler.filter_node(aff(expr("zone", "DoesNotExist")), n, {}) == []
    assert scheduler.filter_node(aff(expr("zone", "Exists"), expr("pool", "Exists")), n, {}) == []  # terms ORed
    assert scheduler.filter_node(aff({"matchFields": [{"key": "metadata.name", "operator": "In",
                                                       "values": ["n2"]}]}), n, {}) == [scheduler.MSG_AFFINITY]


def test_defect3_message_is_worded_as_the_scheduler():
    reasons = [["Insufficient nvidia.com/gpu"]] * 3 + [["node(s) had untolerated taint {gpu: a100}"]]
    assert scheduler.unschedulable_message(4, reasons) == (
        "0/4 nodes are available: 3 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint {gpu: a100}.")
