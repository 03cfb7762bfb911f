"""Issue 12 (operator side): the pure decisions of snapshots on request and ahead of a reclaim."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.test_reconcile import job, pod, svc
from tests.unit.test_reconcile import obs as _obs
from trainingjob_operator import snapshot_requests as sr
from trainingjob_operator.reconcile import SnapshotState, reconcile
from trainingjob_trainer import contract

ANN = contract.ANNOTATION_SNAPSHOT_REQUEST
EMPTY = sr.LiveState()


def running(annotation=None, status_snapshot=None, **spec):
    body = job({"phase": "Running", "attempt": 0, "gangCreated": True, "snapshot": dict(status_snapshot or {}),
                "restarts": {"preemptions": 0, "failures": 0}}, nodes=2, **spec)
    if annotation is not None:
        body["metadata"]["annotations"] = {ANN: annotation}
    return body


def gang(body, node1="n1", **kw):
    return [pod(body, 0, 0, node="n1"), pod(body, 0, 1, node=node1, **kw)]


def obs(body, pods, **kw):
    """The gang's pods and its Service (the rendezvous Service exists: no unrelated Event)."""
    return _obs(pods, [svc(body, 0)], **kw)


def live(request=None, ack=None, step=7):
    return SnapshotState(live=sr.LiveState(
        request=contract.SnapshotRequest(request, "t") if request else None,
        ack=contract.SnapshotAck(ack, step, "2026-11-28T12:00:01.5Z", "s3://b/x/epoch_0_train_step_7") if ack
        else None))


def apply(body, plan):
    out = dict(body)
    out["status"] = plan.status
    return out


def test_issue12_taints_that_announce_a_reclaim_are_found_and_others_ignored():
    node = {"spec": {"taints": [{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"},
                                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
                                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733", "effect": "NoSchedule"}]}}
    assert sr.node_warnings(node, taints=sr.DEFAULT_RECLAIM_TAINTS) == (
        "ToBeDeletedByClusterAutoscaler=1733:NoSchedule", "karpenter.sh/disrupted:NoSchedule")
    assert sr.node_warnings(node, taints=()) == ()
    assert sr.node_warnings({}, taints=sr.DEFAULT_RECLAIM_TAINTS) == ()
    assert sr.parse_taint_list(None) == sr.DEFAULT_RECLAIM_TAINTS
    assert sr.parse_taint_list(" a/b, c ,") == ("a/b", "c") and sr.parse_taint_list("") == ()


def test_issue12_annotation_is_relayed_once_per_value_and_the_ack_recorded():
    body = running("v1")
    plan = reconcile(body, obs(body, gang(body), snapshots=live()))
    assert plan.request_write is not None and plan.request_write.value == "v1"
    req = plan.status["snapshot"]["request"]
    assert (req["value"], req["reason"], req["annotation"]) == ("v1", "Annotation", "v1")
    assert [e.reason for e in plan.events] == ["SnapshotRequested"]
    # Level-triggered: until S3 shows it, the write is repeated (same value: served once) but not re-decided.
    again = reconcile(apply(body, plan), obs(body, gang(body), snapshots=live()))
    assert again.request_write.value == "v1" and again.events == [] and again.status == plan.status
    # In S3 now: nothing more to write.
    there = reconcile(apply(body, plan), obs(body, gang(body), snapshots=live(request="v1")))
    assert there.request_write is None and there.status == plan.status
    # The trainer's ack: status.snapshot.lastRequest, one Event.
    served = reconcile(apply(body, plan), obs(body, gang(body), snapshots=live(request="v1", ack="v1")))
    assert served.status["snapshot"]["lastRequest"] == {
        "value": "v1", "step": 7, "completedAt": "2026-11-28T12:00:01.5Z",
        "snapshot": "s3://b/x/epoch_0_train_step_7"}
    assert [e.reason for e in served.events] == ["SnapshotRequestServed"] and served.request_write is None
    twice = reconcile(apply(body, served), obs(body, gang(body), snapshots=live(request="v1", ack="v1")))
    assert twice.events == [] and twice.status == served.status
    # An ack already naming the value (a restarted operator, a re-created job): no write.
    body2 = running("v1")
    assert reconcile(body2, obs(body2, gang(body2), snapshots=live(ack="v1"))).request_write is None
    # A new value is a new request.
    body3 = running("v2", status_snapshot=served.status["snapshot"])
    nxt = reconcile(body3, obs(body3, gang(body3), snapshots=live(request="v1", ack="v1")))
    assert nxt.request_write.value == "v2" and nxt.status["snapshot"]["lastRequest"]["value"] == "v1"


def test_issue12_no_write_while_s3_is_unread_and_write_errors_go_to_status_and_events():
    body = running("v1")
    unread = reconcile(body, obs(body, gang(body), snapshots=SnapshotState(error="cannot list")))
    assert unread.request_write is None and unread.status["snapshot"]["request"]["value"] == "v1"
    failed = reconcile(apply(body, unread), obs(body, gang(body), snapshots=live(), request_error="cannot write: denied"))
    assert failed.request_write.value == "v1"
    assert failed.status["snapshot"]["requestError"] == "cannot write: denied"
    assert [(e.type, e.reason) for e in failed.events] == [("Warning", "SnapshotRequestFailed")]
    healed = reconcile(apply(body, failed), obs(body, gang(body), snapshots=live(request="v1")))
    assert "requestError" not in healed.status["snapshot"] and healed.events == []


def test_issue12_reclaim_taint_on_a_gang_node_requests_once_per_node_and_attempt_with_an_event():
    body = running()
    warned = {"n2": ("karpenter.sh/disrupted:NoSchedule",)}
    plan = reconcile(body, obs(body, gang(body, node1="n2"), snapshots=live(), node_warnings=warned))
    assert plan.request_write.value == "reclaim-n2-0"
    assert plan.request_write.hold_seconds == 120  # the gang holds at the snapshot: a kill loses no step
    assert contract.SnapshotRequest.from_json(plan.request_write.to_json()) == plan.request_write
    req = plan.status["snapshot"]["request"]
    assert (req["reason"], req["node"], req["reclaims"]) == ("ReclaimWarning", "n2", ["reclaim-n2-0"])
    assert [(e.type, e.reason, e.message) for e in plan.events] == [(
        "Warning", "ReclaimWarning", "node n2 (pod mnist-0-1) has a reclaim warning: taint "
        "karpenter.sh/disrupted:NoSchedule; requested snapshot reclaim-n2-0")]
    later = reconcile(apply(body, plan), obs(body, gang(body, node1="n2"), snapshots=live(request="reclaim-n2-0"),
                                             node_warnings=warned))
    assert later.events == [] and later.request_write is None and later.status == plan.status
    # A taint on a node without a pod of the gang, or nodes not watched: nothing.
    for nodes in ({"n3": ("karpenter.sh/disrupted:NoSchedule",)}, None):
        quiet = reconcile(body, obs(body, gang(body), snapshots=live(), node_warnings=nodes))
        assert quiet.request_write is None and "request" not in quiet.status["snapshot"]


def test_issue12_a_user_request_after_a_reclaim_does_not_bring_the_reclaim_back():
    body = running()
    warned = {"n2": ("karpenter.sh/disrupted:NoSchedule",)}
    first = reconcile(body, obs(body, gang(body, node1="n2"), snapshots=live(), node_warnings=warned))
    body2 = apply(running("mine"), first)
    second = reconcile(body2, obs(body2, gang(body2, node1="n2"), snapshots=live(request="reclaim-n2-0"),
                                  node_warnings=warned))
    assert second.request_write.value == "mine" and [e.reason for e in second.events] == ["SnapshotRequested"]
    assert second.request_write.hold_seconds == 0  # a user's request does not hold (and ends a reclaim hold)
    third = reconcile(apply(body2, second), obs(body2, gang(body2, node1="n2"), snapshots=live(request="mine"),
                                                node_warnings=warned))
    assert third.request_write is None and third.events == []


def test_issue12_disruption_target_condition_counts_unless_switched_off():
    body = running()
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    pods = gang(body, node1="n2", conditions=(cond,))
    plan = reconcile(body, obs(body, pods, snapshots=live()))
    assert plan.request_write.value == "reclaim-n2-0"
    assert "pod condition DisruptionTarget (PreemptionByScheduler)" in [
        e.message for e in plan.events if e.reason == "ReclaimWarning"][0]
    off = dataclasses.replace(sr.ReclaimConfig(), pod_condition=False)
    assert reconcile(body, obs(body, pods, snapshots=live(), reclaim=off)).request_write is None


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_issue12_finished_jobs_relay_nothing(phase):
    body = running("v1")
    body["status"]["phase"] = phase
    plan = reconcile(body, obs(body, gang(body), snapshots=live()))
    assert plan.request_write is None and "request" not in plan.status.get("snapshot", {})


def test_issue12_a_job_without_snapshots_says_once_that_it_ignores_the_request():
    body = running("v1")
    del body["spec"]["snapshot"]
    plan = reconcile(body, obs(body, gang(body), snapshots=None))
    assert plan.request_write is None
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "SnapshotRequestIgnored")]
    assert reconcile(apply(body, plan), obs(body, gang(body), snapshots=None)).events == []


def test_issue12_requests_reach_the_trainer_poll_setting_through_the_pod_env():
    body = running(snapshot={"uri": "s3://bucket/runs", "requestPollSeconds": 2})
    env = {e["name"]: e.get("value") for e in pod(body, 0, 0)["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_CONTROL_POLL_SECONDS] == "2"


def test_issue12_live_cache_gets_the_objects_only_when_their_etag_changes():
    class FS:
        def __init__(self):
            self.objects, self.gets = {}, 0

        def cat_file(self, path, **_kw):
            self.gets += 1
            return self.objects[path]

    fs = FS()
    cache = sr.LiveCache()
    fs.objects["b/r/" + contract.SNAPSHOT_REQUEST_OBJECT] = contract.SnapshotRequest("v1", "t").to_json().encode()
    entries = {contract.SNAPSHOT_REQUEST_OBJECT: {"size": 10, "etag": "e1"}}
    assert cache.read(fs, "b/r", entries).request.value == "v1" and fs.gets == 1
    assert cache.read(fs, "b/r", entries).request.value == "v1" and fs.gets == 1  # unchanged: no GET
    fs.objects["b/r/" + contract.SNAPSHOT_REQUEST_OBJECT] = contract.SnapshotRequest("v2", "t").to_json().encode()
    entries = {contract.SNAPSHOT_REQUEST_OBJECT: {"size": 10, "etag": "e2"}}
    assert cache.read(fs, "b/r", entries).request.value == "v2" and fs.gets == 2
    assert cache.read(fs, "b/r", {}) == sr.LiveState() and fs.gets == 2
