"""Table tests of the pure reconcile: (job, observed) -> plan."""

from __future__ import annotations

import copy
import datetime as dt

import pytest

from trainingjob_operator import builders
from trainingjob_operator.classify import NodeView
from trainingjob_operator.reconcile import Observed, SnapshotState, reconcile
from trainingjob_trainer import contract

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def job(status=None, **spec_over):
    spec = {
        "image": "trainer:1",
        "command": ["torchrun", "train.py"],
        "nodes": 3,
        "procsPerNode": 2,
        "recovery": {"maxPreemptions": 2, "maxFailures": 1, "backoffSeconds": 10, "maxBackoffSeconds": 60},
        "snapshot": {"uri": "s3://bucket/runs", "credentialsSecret": "s3-creds"},
    }
    spec.update(spec_over)
    body = {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": "mnist", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


def pod(body, attempt, rank, phase="Running", ready=True, exit_code=None, message=None, conditions=(), node="n1",
        deleting=False, reason=None):
    p = builders.get_pod(body, _spec(body), attempt=attempt, rank=rank, resume_from=None)
    p["spec"]["nodeName"] = node
    st = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}, *conditions]}
    if reason:
        st["reason"] = reason
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                "finishedAt": "2026-11-28T11:59:00Z"}
        if message:
            term["message"] = message
        st["containerStatuses"] = [{"name": contract.CONTAINER_NAME, "state": {"terminated": term}}]
    p["status"] = st
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2026-11-28T11:59:30Z"
    return p


def svc(body, attempt):
    return builders.get_service(body, attempt)


def _spec(body):
    from trainingjob_operator.model import parse_spec
    return parse_spec(body["spec"])


def obs(pods=(), services=(), **kw):
    kw.setdefault("nodes", {"n1": NodeView(True), "n2": NodeView(True)})
    kw.setdefault("snapshots", SnapshotState())  # S3 read fine, no snapshot yet
    return Observed(now=NOW, pods=tuple(pods), services=tuple(services), **kw)


def creates(plan, kind=None):
    return sorted(a.name for a in plan.actions if a.verb == "create" and (kind is None or a.kind == kind))


def deletes(plan):
    return sorted(a.name for a in plan.actions if a.verb == "delete")


def apply(body, plan):
    b = copy.deepcopy(body)
    b["status"] = copy.deepcopy(plan.status)
    return b


def running_status(attempt=0, **extra):
    st = {"phase": "Running", "attempt": attempt, "gangCreated": True,
          "restarts": {"preemptions": 0, "failures": 0}}
    st.update(extra)
    return st


# ---------------------------------------------------------------- the table
def test_fresh_job_creates_service_and_all_pods_and_records_attempt_first():
    b = job()
    plan = reconcile(b, obs())
    assert creates(plan, "Service") == ["mnist-0"]
    assert creates(plan, "Pod") == ["mnist-0-0", "mnist-0-1", "mnist-0-2"]
    assert plan.status["attempt"] == 0 and plan.status["phase"] == "Pending"
    assert plan.status.get("gangCreated") is not True  # only once they are observed
    assert plan.status["workers"]["desired"] == 3


def test_partially_created_gang_creates_only_the_missing_pods():
    b = job(status={"attempt": 0, "phase": "Pending"})
    existing = [pod(b, 0, 0, phase="Pending", ready=False)]
    plan = reconcile(b, obs(existing, [svc(b, 0)]))
    assert creates(plan) == ["mnist-0-1", "mnist-0-2"]
    assert deletes(plan) == []


def test_gang_complete_is_recorded_and_running_when_all_ready():
    b = job(status={"attempt": 0, "phase": "Pending"})
    pods = [pod(b, 0, r) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["gangCreated"] is True
    assert plan.status["phase"] == "Running"
    assert plan.status["workers"] == {"desired": 3, "ready": 3, "succeeded": 0, "summary": "3/3"}
    assert creates(plan) == []


def test_one_pod_failed_fences_whole_gang_and_backs_off():
    b = job(status=running_status())
    pods = [pod(b, 0, 0), pod(b, 0, 1, phase="Failed", ready=False, exit_code=3,
                                 message="Traceback: boom"), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    st = plan.status
    assert st["attempt"] == 1 and st["gangCreated"] is False
    assert st["restarts"] == {"preemptions": 0, "failures": 1}
    assert st["phase"] == "Restarting" and st["reason"] == "WorkerFailed"
    assert st["nextRestartTime"] == "2026-11-28T12:00:10Z"
    assert st["lastDisruption"]["exitCode"] == 3 and st["lastDisruption"]["pod"] == "mnist-0-1"
    assert deletes(plan) == ["mnist-0", "mnist-0-0", "mnist-0-1", "mnist-0-2"]
    assert any(e.type == "Warning" and e.reason == "WorkerFailed" for e in plan.events)


def test_restart_waits_for_fencing_then_backoff_then_creates():
    b = job(status={**running_status(attempt=1, gangCreated=False),
                    "nextRestartTime": "2026-11-28T12:00:10Z"})
    old = [pod(b, 0, 0, deleting=True)]
    plan = reconcile(b, obs(old))
    assert creates(plan) == [] and plan.status["reason"] == "FencingPreviousAttempt"
    plan = reconcile(b, obs([]))
    assert creates(plan) == [] and plan.status["reason"] == "BackoffBeforeRestart"
    assert plan.requeue_after == pytest.approx(10)
    later = Observed(now=NOW + dt.timedelta(seconds=11), nodes={"n1": NodeView(True)}, snapshots=SnapshotState())
    plan = reconcile(b, later)
    assert creates(plan, "Pod") == ["mnist-1-0", "mnist-1-1", "mnist-1-2"]


def test_all_succeeded():
    b = job(status=running_status())
    pods = [pod(b, 0, r, phase="Succeeded", ready=False, exit_code=0) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["completionTime"] == "2026-11-28T12:00:00Z"
    # cleanPodPolicy Running: finished pods are kept for their logs, the Service goes.
    assert deletes(plan) == ["mnist-0"]


def test_partial_success_keeps_running():
    b = job(status=running_status())
    pods = [pod(b, 0, 0, phase="Succeeded", ready=False, exit_code=0), pod(b, 0, 1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Running" and deletes(plan) == []


def test_suspend_fences_gang_and_resume_starts_new_attempt():
    b = job(status=running_status(), suspend=True)
    pods = [pod(b, 0, r) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Suspended" and plan.status["attempt"] == 1
    assert deletes(plan) == ["mnist-0", "mnist-0-0", "mnist-0-1", "mnist-0-2"]
    b2 = apply(b, plan)
    b2["spec"]["suspend"] = False
    plan2 = reconcile(b2, obs([]))
    assert creates(plan2, "Pod") == ["mnist-1-0", "mnist-1-1", "mnist-1-2"]
    assert plan2.status["restarts"] == {"preemptions": 0, "failures": 0}
    assert any(e.reason == "Resumed" for e in plan2.events)


def test_deleted_job_does_nothing():
    b = job(status=running_status())
    b["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:00Z"
    plan = reconcile(b, obs([pod(b, 0, 0)]))
    assert plan.actions == [] and plan.status == b["status"]


def test_failure_budget_exhausted_fails_with_pod_node_and_exit_code():
    b = job(status=running_status(attempt=1, restarts={"preemptions": 0, "failures": 1}))
    pods = [pod(b, 1, 0), pod(b, 1, 1, phase="Failed", ready=False, exit_code=7, node="n2",
                                 message='{"reason":"Error","message":"CUDA error","step":5}'), pod(b, 1, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 1)]))
    st = plan.status
    assert st["phase"] == "Failed" and st["reason"] == "FailureBudgetExhausted"
    assert "mnist-1-1" in st["message"] and "node n2" in st["message"] and "code 7" in st["message"]
    assert "CUDA error" in st["message"]
    assert st["restarts"]["failures"] == 1 and st["attempt"] == 1
    assert deletes(plan) == ["mnist-1", "mnist-1-0", "mnist-1-2"]  # running pods and the Service


def test_preemption_counts_apart_from_failures():
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    b = job(status=running_status(restarts={"preemptions": 0, "failures": 1}))
    # the preempted pod's peers fail because the rendezvous broke: still a preemption
    pods = [pod(b, 0, 0, conditions=[cond], deleting=True),
            pod(b, 0, 1, phase="Failed", ready=False, exit_code=1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 1, "failures": 1}
    assert plan.status["lastDisruption"]["reason"] == "PreemptionByScheduler"
    assert "nextRestartTime" not in plan.status


def test_preemption_budget_exhausted_has_its_own_reason():
    b = job(status=running_status(restarts={"preemptions": 2, "failures": 0}))
    pods = [pod(b, 0, 0, phase="Failed", ready=False, reason="Evicted"), pod(b, 0, 1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "PreemptionBudgetExhausted"
    assert plan.status["restarts"] == {"preemptions": 2, "failures": 0}


def test_missing_pod_after_gang_created_is_a_disruption():
    b = job(status=running_status())
    plan = reconcile(b, obs([pod(b, 0, 0), pod(b, 0, 2)], [svc(b, 0)]))
    assert plan.status["restarts"]["preemptions"] == 1
    assert plan.status["lastDisruption"]["pod"] == "mnist-0-1"


def test_node_not_ready_is_held_then_lost():
    b = job(status=running_status())
    since = NOW - dt.timedelta(seconds=30)
    nodes = {"n1": NodeView(True), "n2": NodeView(False, since)}
    pods = [pod(b, 0, 0, node="n2"), pod(b, 0, 1, phase="Failed", ready=False, exit_code=1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)], nodes=nodes))
    assert plan.status["attempt"] == 0 and plan.actions == []  # held: node may come back
    nodes = {"n1": NodeView(True), "n2": NodeView(False, NOW - dt.timedelta(seconds=61))}
    plan = reconcile(b, obs(pods, [svc(b, 0)], nodes=nodes))
    assert plan.status["restarts"]["preemptions"] == 1
    assert plan.status["lastDisruption"]["reason"] == "NodeLost"


def test_preempted_after_snapshot_exit_code_is_a_preemption_and_lost_work_counts_from_snapshot():
    msg = contract.format_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_PREEMPTED, step=40, snapshot="s3://bucket/runs/ml/mnist/epoch_0_train_step_40"))
    b = job(status=running_status())
    pods = [pod(b, 0, r, phase="Failed", ready=False, exit_code=contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, message=msg)
            for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 1, "failures": 0}
    assert plan.status["lastDisruption"]["step"] == 40
    b2 = apply(b, plan)
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_40", "step": 40, "epoch": 0,
              "savedAt": "2026-11-28T11:59:59Z", "bytes": 10}
    plan2 = reconcile(b2, obs([], snapshots=SnapshotState(latest=latest, count=1)))
    assert plan2.status["snapshot"]["restoredFrom"] == latest["uri"]
    assert plan2.status["lostWork"]["steps"] == 0
    env = {e["name"]: e.get("value") for a in plan2.actions if a.kind == "Pod" for e in a.body["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_RESUME_FROM] == latest["uri"]
    assert env[contract.ENV_ATTEMPT] == "1"


def test_lost_work_when_node_lost_without_emergency_snapshot():
    b = job(status=running_status(attempt=0, lastDisruption={
        "kind": "Preemption", "reason": "NodeLost", "step": 57, "attempt": 0}, gangCreated=False))
    b["status"]["attempt"] = 1
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_50", "step": 50, "epoch": 0,
              "savedAt": "2026-11-28T11:59:00Z", "bytes": 10}
    plan = reconcile(b, obs([], snapshots=SnapshotState(latest=latest, count=2)))
    assert plan.status["lostWork"]["steps"] == 7
    plan2 = reconcile(apply(b, plan), obs([], snapshots=SnapshotState(latest=latest, count=2)))
    assert plan2.status["lostWork"]["steps"] == 7  # counted once


def test_invalid_spec_is_failed_not_raised():
    b = job(status=None)
    b["metadata"]["name"] = "x" * 60
    plan = reconcile(b, obs())
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert "at most" in plan.status["message"]
    assert plan.actions == []


def test_status_lost_adopts_newest_attempt_instead_of_second_gang():
    b = job(status=None)
    pods = [pod(b, 4, r) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 4)]))
    assert plan.status["attempt"] == 4 and creates(plan) == []


@pytest.mark.parametrize("case", ["fresh", "partial", "failed", "succeeded", "suspended", "preempted", "running"])
def test_reconcile_twice_changes_nothing_more(case):
    b = job(status=running_status())
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    worlds = {
        "fresh": (job(), []),
        "partial": (job(status={"attempt": 0}), [pod(b, 0, 0)]),
        "failed": (b, [pod(b, 0, 0), pod(b, 0, 1, phase="Failed", ready=False, exit_code=1), pod(b, 0, 2)]),
        "succeeded": (b, [pod(b, 0, r, phase="Succeeded", ready=False, exit_code=0) for r in range(3)]),
        "suspended": (job(status=running_status(), suspend=True), [pod(b, 0, r) for r in range(3)]),
        "preempted": (b, [pod(b, 0, 0, conditions=[cond]), pod(b, 0, 1), pod(b, 0, 2)]),
        "running": (b, [pod(b, 0, r) for r in range(3)]),
    }
    body, pods = worlds[case]
    world = obs(pods, [svc(b, 0)])
    first = reconcile(body, world)
    second = reconcile(apply(body, first), world)
    assert second.status == first.status
    assert second.events == []
    assert {(a.verb, a.kind, a.name) for a in second.actions} <= {(a.verb, a.kind, a.name) for a in first.actions}


def test_fencing_force_deletes_pods_on_a_lost_node_only():
    b = job(status=running_status())
    nodes = {"n1": NodeView(True), "n2": NodeView(False, NOW - dt.timedelta(seconds=120))}
    pods = [pod(b, 0, 0, node="n1"), pod(b, 0, 1, node="n2"), pod(b, 0, 2, node="n1")]
    plan = reconcile(b, obs(pods, [svc(b, 0)], nodes=nodes))
    assert plan.status["lastDisruption"]["reason"] == "NodeLost"
    forced = sorted(a.name for a in plan.actions if a.verb == "delete" and a.force)
    assert forced == ["mnist-0-1"]
    # The graceful delete of a pod on a lost node never completes: fencing forces it.
    b2 = apply(b, plan)
    pods[1]["metadata"]["deletionTimestamp"] = "2026-11-28T11:59:59Z"
    plan2 = reconcile(b2, obs(pods, [], nodes=nodes))
    assert [a.name for a in plan2.actions if a.force] == ["mnist-0-1"]


def test_failure_waits_for_the_rest_of_the_gang_before_counting():
    b = job(status=running_status(), recovery={"maxFailures": 3, "failureSettleSeconds": 45})
    failed = pod(b, 0, 1, phase="Failed", ready=False, exit_code=1)
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-11-28T11:59:50Z"
    pods = [pod(b, 0, 0), failed, pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["attempt"] == 0 and plan.actions == [] and plan.status["reason"] == "WorkerEnded"
    # the rest of the gang ended too: a failure, decided at once
    done = [pod(b, 0, 0, phase="Failed", ready=False, exit_code=1), failed,
            pod(b, 0, 2, phase="Failed", ready=False, exit_code=1)]
    assert reconcile(b, obs(done, [svc(b, 0)])).status["restarts"]["failures"] == 1
    # or the settle time passed with the others still running
    later = Observed(now=NOW + dt.timedelta(seconds=36), pods=tuple(pods), services=(svc(b, 0),),
                     nodes={"n1": NodeView(True)})
    assert reconcile(b, later).status["restarts"]["failures"] == 1


def test_snapshot_stalled_condition_after_missing_intervals():
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_40", "step": 40, "epoch": 0,
              "savedAt": "2026-11-28T11:58:00Z", "bytes": 10, "seconds": 1.0, "emergency": False}
    st = running_status(attemptStartTime="2026-11-28T11:50:00Z")
    b = job(status=st)
    pods = [pod(b, 0, r) for r in range(3)]
    # snapshots every 30 s, the newest 120 s old, stallAfterIntervals 3 (default): stalled
    snaps = SnapshotState(latest=latest, count=2, interval_seconds=30.0)
    plan = reconcile(b, obs(pods, [svc(b, 0)], snapshots=snaps))
    cond = next(c for c in plan.status["conditions"] if c["type"] == "SnapshotStalled")
    assert cond["status"] == "True" and cond["reason"] == "NoNewSnapshot" and "since 2026-11-28T11:58:00Z" in cond["message"]
    assert plan.status["snapshot"]["latest"] == latest and plan.status["snapshot"]["count"] == 2
    # every 60 s: 120 s is within 3 intervals
    plan = reconcile(b, obs(pods, [svc(b, 0)], snapshots=SnapshotState(latest=latest, count=2, interval_seconds=60.0)))
    assert next(c for c in plan.status["conditions"] if c["type"] == "SnapshotStalled")["status"] == "False"


def test_s3_errors_are_reported_not_raised():
    b = job(status=running_status())
    pods = [pod(b, 0, r) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)], snapshots=SnapshotState(error="cannot list s3://bucket: AccessDenied")))
    assert plan.status["snapshot"]["lastError"].endswith("AccessDenied") and plan.status["phase"] == "Running"


def test_explicit_resume_from_wins_on_the_first_attempt_only():
    other = "s3://bucket/runs/ml/pretrain/epoch_3_train_step_9000"
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_20", "step": 20, "epoch": 0,
              "savedAt": "2026-11-28T11:59:00Z", "bytes": 1}
    b = job(snapshot={"uri": "s3://bucket/runs", "resumeFrom": other})
    plan = reconcile(b, obs([], snapshots=SnapshotState(latest=latest, count=1)))
    assert plan.status["snapshot"]["restoredFrom"] == other
    b2 = job(status=running_status(attempt=1, gangCreated=False, restarts={"preemptions": 1, "failures": 0}),
             snapshot={"uri": "s3://bucket/runs", "resumeFrom": other})
    plan = reconcile(b2, obs([], snapshots=SnapshotState(latest=latest, count=1)))
    assert plan.status["snapshot"]["restoredFrom"] == latest["uri"]
    assert plan.status["snapshot"]["restoredStep"] == 20


def test_failed_pod_on_a_dead_node_is_not_held_forever():
    b = job(status=running_status())
    nodes = {"n1": NodeView(True), "n2": NodeView(False, NOW - dt.timedelta(days=1))}
    pods = [pod(b, 0, 0, phase="Failed", ready=False, exit_code=2, node="n2"),
            pod(b, 0, 1, phase="Failed", ready=False, exit_code=1), pod(b, 0, 2, phase="Failed", ready=False,
                                                                           exit_code=1)]
    plan = reconcile(b, obs(pods, [svc(b, 0)], nodes=nodes))
    assert plan.status["restarts"]["failures"] == 1


def test_lost_work_uses_steps_reported_while_fencing_and_the_ended_gangs_snapshots():
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    b = job(status=running_status())
    running = [pod(b, 0, 0, conditions=[cond], deleting=True), pod(b, 0, 1), pod(b, 0, 2)]
    plan = reconcile(b, obs(running, [svc(b, 0)]))
    assert "step" not in plan.status["lastDisruption"]  # decided before anyone exited
    b1 = apply(b, plan)
    msg = contract.format_termination_message(contract.TerminationMessage(reason="PreemptedWithoutSnapshot", step=57))
    exited = [pod(b, 0, r, phase="Failed", ready=False, exit_code=143, message=msg, deleting=True) for r in range(3)]
    plan = reconcile(b1, obs(exited))
    assert plan.status["lastDisruption"]["step"] == 57
    b2 = apply(b1, plan)
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_50", "step": 50, "epoch": 0,
              "savedAt": "2026-11-28T11:59:00Z", "bytes": 1}
    plan = reconcile(b2, obs([], snapshots=SnapshotState(latest=latest, count=1, latest_attempt=0)))
    assert plan.status["lostWork"]["steps"] == 7
    # An emergency snapshot by the ended gang: it got (at least) that far, nothing lost.
    b3 = apply(b, reconcile(b, obs(running, [svc(b, 0)])))
    em = dict(latest, step=61, uri="s3://bucket/runs/ml/mnist/epoch_0_train_step_61")
    plan = reconcile(b3, obs([], snapshots=SnapshotState(latest=em, count=2, latest_attempt=0)))
    assert plan.status["lostWork"]["steps"] == 0 and plan.status["snapshot"]["restoredStep"] == 61


def test_restart_waits_for_an_unreadable_snapshot_folder_then_goes_on():
    b = job(status=running_status(attempt=1, gangCreated=False, lastDisruption={
        "kind": "Preemption", "reason": "PreemptionByScheduler", "step": 57, "attempt": 0,
        "at": "2026-11-28T11:59:50Z"}))
    err = SnapshotState(error="cannot list: EndpointConnectionError")
    plan = reconcile(b, obs([], snapshots=err))
    assert creates(plan) == [] and plan.status["reason"] == "WaitingForSnapshotStatus"
    later = Observed(now=NOW + dt.timedelta(seconds=70), nodes={"n1": NodeView(True)}, snapshots=err)
    plan = reconcile(b, later)
    assert creates(plan, "Pod") == ["mnist-1-0", "mnist-1-1", "mnist-1-2"]
    assert plan.status["lostWork"]["steps"] == 0  # unknown resume point: nothing invented


def test_status_is_stable_while_time_passes():
    """Written only when it changed: no countdowns or ages in status."""
    latest = {"uri": "s3://bucket/runs/ml/mnist/epoch_0_train_step_40", "step": 40, "epoch": 0,
              "savedAt": "2026-11-28T11:58:00Z", "bytes": 10, "seconds": 1.0, "emergency": False}
    snaps = SnapshotState(latest=latest, count=2, interval_seconds=30.0)
    worlds = {
        "running-stalled": job(status=running_status(attemptStartTime="2026-11-28T11:50:00Z")),
        "backoff": job(status={**running_status(attempt=1, gangCreated=False),
                               "nextRestartTime": "2026-11-28T12:10:00Z"}),
    }
    for name, b in worlds.items():
        pods = [pod(b, 0, r) for r in range(3)] if name.startswith("running") else []
        first = reconcile(b, obs(pods, [svc(b, 0)] if pods else [], snapshots=snaps))
        later = Observed(now=NOW + dt.timedelta(seconds=7), pods=tuple(pods), services=(svc(b, 0),) if pods else (),
                         nodes={"n1": NodeView(True)}, snapshots=snaps)
        second = reconcile(apply(b, first), later)
        assert second.status == first.status, name


@pytest.mark.parametrize("reason", ["Evicted", "Terminated", "Shutdown", "NodeShutdown", "NodeLost"])
def test_disrupted_pod_reasons_are_preemptions(reason):
    b = job(status=running_status())
    pods = [pod(b, 0, 0, phase="Failed", ready=False, reason=reason), pod(b, 0, 1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 1, "failures": 0}
    assert plan.status["lastDisruption"]["reason"] == reason


def test_oomkilled_is_a_failure():
    b = job(status=running_status())
    oom = pod(b, 0, 1, phase="Failed", ready=False, exit_code=137)
    oom["status"]["containerStatuses"][0]["state"]["terminated"].update(reason="OOMKilled",
                                                                         finishedAt="2026-11-28T11:58:30Z")
    others = [pod(b, 0, r, phase="Failed", ready=False, exit_code=1) for r in (0, 2)]
    plan = reconcile(b, obs([oom, *others], [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 1}
    assert "OOMKilled" in plan.status["lastDisruption"]["message"]


@pytest.mark.parametrize("policy,expected", [
    ("All", ["mnist-0", "mnist-0-0", "mnist-0-1", "mnist-0-2"]),
    ("None", []),
    ("Running", ["mnist-0"]),
])
def test_clean_pod_policy(policy, expected):
    b = job(status=running_status(), cleanPodPolicy=policy)
    pods = [pod(b, 0, r, phase="Succeeded", ready=False, exit_code=0) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Succeeded" and deletes(plan) == expected


def test_pod_template_is_merged_and_operator_fields_win():
    tmpl = {"metadata": {"labels": {"team": "ml"}, "annotations": {"a": "b"}},
            "spec": {"nodeSelector": {"pool": "spot"}, "priorityClassName": "low",
                     "tolerations": [{"key": "spot", "operator": "Exists"}],
                     "volumes": [{"name": "data", "emptyDir": {}}], "imagePullSecrets": [{"name": "reg"}]}}
    b = job(podTemplate=tmpl, volumeMounts=[{"name": "data", "mountPath": "/data"}])
    plan = reconcile(b, obs())
    p = next(a.body for a in plan.actions if a.kind == "Pod")
    assert p["metadata"]["labels"]["team"] == "ml" and p["metadata"]["annotations"] == {"a": "b"}
    assert p["metadata"]["labels"][contract.LABEL_JOB_NAME] == "mnist"
    spec = p["spec"]
    assert spec["nodeSelector"] == {"pool": "spot"} and spec["priorityClassName"] == "low"
    assert spec["tolerations"] == tmpl["spec"]["tolerations"] and spec["imagePullSecrets"] == [{"name": "reg"}]
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["hostname"] == p["metadata"]["name"] and spec["subdomain"] == "mnist-0"


# ---------------------------------------------------------------- issue 9
def test_defect5_exit84_snapshot_storage_error_fails_the_job_without_retrying():
    b = job(status=running_status(), recovery={"maxFailures": 5})
    pods = [pod(b, 0, r, phase="Failed", ready=False, exit_code=contract.EXIT_SNAPSHOT_CONFIG_ERROR) for r in range(3)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "SnapshotStorageError"
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 0} and plan.status["attempt"] == 0
    assert "spec.snapshot or the credentials Secret" in plan.status["message"]
    assert [e.reason for e in plan.events] == ["SnapshotStorageError"]


def backoff_of(plan):
    from trainingjob_operator.classify import parse_time
    return (parse_time(plan.status["nextRestartTime"]) - NOW).total_seconds()


def test_defect5_kubelet_admission_rejection_restarts_without_counting():
    b = job(status=running_status())
    rejected = pod(b, 0, 1, phase="Failed", ready=False, reason="OutOfnvidia.com/gpu")
    rejected["status"]["message"] = "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu"
    plan = reconcile(b, obs([pod(b, 0, 0), rejected, pod(b, 0, 2)], [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 0, "transient": 1}
    assert plan.status["attempt"] == 1 and plan.status["reason"] == "TransientRestart"
    assert 11 <= backoff_of(plan) <= 15  # backed off: 10 s plus a per-job jitter
    assert plan.status["lastDisruption"]["kind"] == "Transient"


def test_defect5_evicted_over_its_own_limit_is_a_failure_not_a_preemption():
    b = job(status=running_status())
    ev = pod(b, 0, 1, phase="Failed", ready=False, reason="Evicted")
    ev["status"]["message"] = "Pod ephemeral local storage usage exceeds the total limit of containers 1Gi. "
    plan = reconcile(b, obs([ev, pod(b, 0, 0), pod(b, 0, 2)], [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 1}
    assert plan.status["lastDisruption"]["reason"] == "EvictedOverLimit"


def test_issue8_save_seconds_shown_in_last_disruption():
    msg = contract.format_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_PREEMPTED, step=40, snapshot="s3://bucket/runs/ml/mnist/epoch_0_train_step_40",
        save_seconds=2.5))
    b = job(status=running_status())
    pods = [pod(b, 0, 0, phase="Failed", ready=False, exit_code=contract.EXIT_PREEMPTED_AFTER_SNAPSHOT, message=msg),
            pod(b, 0, 1), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["lastDisruption"]["saveSeconds"] == 2.5
    # reported by another pod while fencing: the longest save is kept
    slower = contract.format_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_PREEMPTED, step=40, save_seconds=3.75))
    fenced = [pod(b, 0, r, phase="Failed", ready=False, exit_code=contract.EXIT_PREEMPTED_AFTER_SNAPSHOT,
                  message=slower, deleting=True) for r in (1, 2)]
    plan2 = reconcile(apply(b, plan), obs(fenced, []))
    assert plan2.status["lastDisruption"]["saveSeconds"] == 3.75


def test_defect6_default_failure_settle_outlasts_the_node_monitor_grace_period():
    """A survivor's error 50 s after its peer's node went silent is held (k8s >= 1.32 marks it at 50+5 s)."""
    b = job(status=running_status(), recovery={"maxFailures": 3})
    failed = pod(b, 0, 1, phase="Failed", ready=False, exit_code=1)
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-11-28T11:59:00Z"
    pods = [pod(b, 0, 0), failed, pod(b, 0, 2)]
    at = NOW + dt.timedelta(seconds=-60 + 56)  # 56 s after the failure, node not yet NotReady
    plan = reconcile(b, Observed(now=at, pods=tuple(pods), services=(svc(b, 0),), nodes={"n1": NodeView(True)},
                                 snapshots=SnapshotState()))
    assert plan.status["restarts"]["failures"] == 0 and plan.status["reason"] == "WorkerEnded"


def test_defect10_running_job_stays_running_while_a_node_is_judged():
    b = job(status=running_status(attempt=0, attemptStartTime="2026-11-28T11:50:00Z"))
    nodes = {"n1": NodeView(True), "n2": NodeView(False, NOW - dt.timedelta(seconds=10))}
    # The node lifecycle controller marked the lost node's pod Ready=False.
    pods = [pod(b, 0, 0), pod(b, 0, 1, node="n2", ready=False), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)], nodes=nodes))
    assert plan.status["phase"] == "Running" and plan.status["reason"] == "NodeNotReady"
    assert "n2" in plan.status["message"] and plan.status["workers"]["ready"] == 2
    assert plan.status["attempt"] == 0 and plan.actions == []


def waiting_pod(b, rank, reason, message):
    p = pod(b, 0, rank, phase="Pending", ready=False)
    p["status"]["containerStatuses"] = [{"name": contract.CONTAINER_NAME,
                                         "state": {"waiting": {"reason": reason, "message": message}}}]
    return p


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                    "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff"])
def test_defect4_waiting_containers_surface_in_status_and_events_at_once(reason):
    b = job(status={**running_status(), "phase": "Pending", "attemptStartTime": "2026-11-28T11:59:00Z"})
    pods = [pod(b, 0, 0), waiting_pod(b, 1, reason, f"the {reason} text"), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == reason
    assert f"pod mnist-0-1: {reason}: the {reason} text" in plan.status["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", reason)]


@pytest.mark.parametrize("reason,fails", [("InvalidImageName", True), ("CreateContainerConfigError", True),
                                          ("ImagePullBackOff", False)])
def test_defect4_permanent_waiting_reasons_fail_after_startup_timeout(reason, fails):
    b = job(status={**running_status(), "phase": "Pending", "attemptStartTime": "2026-11-28T11:54:00Z"},
            recovery={"startupTimeoutSeconds": 300})
    msg = 'couldn\'t find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds'
    pods = [pod(b, 0, 0), waiting_pod(b, 1, reason, msg), pod(b, 0, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    if fails:
        assert plan.status["phase"] == "Failed" and plan.status["reason"] == reason
        assert msg in plan.status["message"] and "startupTimeoutSeconds=300" in plan.status["message"]
        assert plan.status["restarts"] == {"preemptions": 0, "failures": 0}
    else:
        assert plan.status["phase"] == "Pending" and plan.status["reason"] == reason


def unschedulable_pod(b, rank, message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."):
    p = pod(b, 0, rank, phase="Pending", ready=False, node=None)
    p["status"]["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": message})
    return p


def test_defect3_unschedulable_gang_reported_then_retried_uncounted_after_timeout():
    st = {**running_status(), "phase": "Pending", "attemptStartTime": "2026-11-28T11:58:00Z"}
    b = job(status=st, recovery={"schedulingTimeoutSeconds": 300, "backoffSeconds": 10})
    pods = [pod(b, 0, 0), pod(b, 0, 1), unschedulable_pod(b, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "Unschedulable"
    assert "4 Insufficient nvidia.com/gpu" in plan.status["message"] and plan.actions == []
    assert [e.reason for e in plan.events] == ["Unschedulable"]
    assert plan.requeue_after <= 180
    b["status"]["attemptStartTime"] = "2026-11-28T11:55:00Z"
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 0, "transient": 1}
    assert plan.status["attempt"] == 1 and plan.status["reason"] == "Unschedulable"
    assert 11 <= backoff_of(plan) <= 15
    assert deletes(plan) == ["mnist-0", "mnist-0-0", "mnist-0-1", "mnist-0-2"]


def test_defect3_rendezvous_timeout_of_a_partial_gang_is_not_a_failure():
    b = job(status={**running_status(), "phase": "Pending", "attemptStartTime": "2026-11-28T11:58:00Z"})
    pods = [pod(b, 0, 0, phase="Failed", ready=False, exit_code=1,
                message="torch.distributed.DistNetworkError: ... timed out"),
            pod(b, 0, 1), unschedulable_pod(b, 2)]
    plan = reconcile(b, obs(pods, [svc(b, 0)]))
    assert plan.status["restarts"] == {"preemptions": 0, "failures": 0, "transient": 1}
    assert plan.status["lastDisruption"]["reason"] == "Unschedulable"


def test_defect3_queue_name_labels_the_attempt_as_a_kueue_pod_group():
    b = job(queueName="team-a")
    plan = reconcile(b, obs())
    pods = [a.body for a in plan.actions if a.kind == "Pod"]
    assert len(pods) == 3
    for p in pods:
        assert p["metadata"]["labels"][contract.KUEUE_LABEL_QUEUE_NAME] == "team-a"
        assert p["metadata"]["labels"][contract.KUEUE_LABEL_POD_GROUP_NAME] == "mnist-0"
        assert p["metadata"]["annotations"][contract.KUEUE_ANNOTATION_POD_GROUP_TOTAL_COUNT] == "3"
    assert contract.KUEUE_LABEL_QUEUE_NAME not in creates_bodies(reconcile(job(), obs()))[0]["metadata"]["labels"]


def creates_bodies(plan):
    return [a.body for a in plan.actions if a.verb == "create" and a.kind == "Pod"]


def test_defect3_kueue_suspend_of_a_running_queued_job_is_a_preemption():
    b = job(status=running_status(), suspend=True, queueName="team-a")
    plan = reconcile(b, obs([pod(b, 0, r) for r in range(3)], [svc(b, 0)]))
    assert plan.status["phase"] == "Suspended"
    assert plan.status["restarts"] == {"preemptions": 1, "failures": 0}
    assert plan.status["lastDisruption"]["reason"] == "SuspendedByKueue"
    # a user's suspend of an unqueued job is not
    b2 = job(status=running_status(), suspend=True)
    assert reconcile(b2, obs([pod(b2, 0, r) for r in range(3)], [svc(b2, 0)])).status["restarts"]["preemptions"] == 0


def test_defect9_deleted_rendezvous_service_is_recreated():
    b = job(status=running_status())
    plan = reconcile(b, obs([pod(b, 0, r) for r in range(3)], []))
    assert creates(plan) == ["mnist-0"]
    assert [e.reason for e in plan.events] == ["ServiceRecreated"]
    assert reconcile(b, obs([pod(b, 0, r) for r in range(3)], [svc(b, 0)])).actions == []


def test_defect9_service_selector_includes_the_job_uid():
    sel = svc(job(), 0)["spec"]["selector"]
    assert sel[contract.LABEL_JOB_UID] == "uid-1"
    p = pod(job(), 0, 0)
    assert all(p["metadata"]["labels"][k] == v for k, v in sel.items())


def test_defect15_suspend_and_resume_during_backoff_keeps_the_backoff():
    b = job(status={**running_status(attempt=1, gangCreated=False), "phase": "Restarting",
                    "nextRestartTime": "2026-11-28T12:00:30Z"}, suspend=True)
    plan = reconcile(b, obs([]))
    b2 = apply(b, plan)
    b2["spec"]["suspend"] = False
    plan2 = reconcile(b2, Observed(now=NOW + dt.timedelta(seconds=5), nodes={"n1": NodeView(True)},
                                   snapshots=SnapshotState()))
    assert creates(plan2) == [] and plan2.status["reason"] == "BackoffBeforeRestart"
    assert plan2.requeue_after == pytest.approx(25)


def test_defect8_fencing_past_its_timeout_forces_on_a_not_ready_node_else_reports_stuck():
    b = job(status={**running_status(attempt=1, gangCreated=False), "phase": "Restarting"},
            recovery={"fenceTimeoutSeconds": 60, "nodeNotReadySeconds": 300})
    stale = "2026-11-28T11:58:30Z"  # 90 s past the deletion deadline
    on_bad = pod(b, 0, 0, node="n2", deleting=True)
    on_good = pod(b, 0, 1, node="n1", deleting=True)
    for p in (on_bad, on_good):
        p["metadata"]["deletionTimestamp"] = stale
    nodes = {"n1": NodeView(True), "n2": NodeView(False, NOW - dt.timedelta(seconds=20))}
    plan = reconcile(b, obs([on_bad, on_good], nodes=nodes))
    assert [a.name for a in plan.actions if a.force] == ["mnist-0-0"]
    cond = next(c for c in plan.status["conditions"] if c["type"] == "FencingStuck")
    assert cond["status"] == "True" and "pod mnist-0-1 on node n1" in cond["message"]
    assert "mnist-0-0" not in cond["message"]
    assert [e.reason for e in plan.events] == ["FencingStuck"]
    # within the timeout: nothing forced, nothing stuck
    fresh = [pod(b, 0, 0, node="n2", deleting=True)]
    fresh[0]["metadata"]["deletionTimestamp"] = "2026-11-28T11:59:30Z"
    plan2 = reconcile(b, obs(fresh, nodes=nodes))
    assert not [a for a in plan2.actions if a.force]
    assert all(c["type"] != "FencingStuck" for c in plan2.status.get("conditions", []))
    # once the pods are gone the condition is cleared
    plan3 = reconcile(apply(b, plan), obs([], nodes=nodes))
    cond3 = next(c for c in plan3.status["conditions"] if c["type"] == "FencingStuck")
    assert cond3["status"] == "False"


def test_defect3_jitter_separates_two_gangs_retried_together():
    a, b = job(status=running_status()), job(status=running_status())
    b["metadata"]["uid"] = "uid-2"
    delays = []
    for body in (a, b):
        pods = [pod(body, 0, 0), pod(body, 0, 1), unschedulable_pod(body, 2)]
        body["status"]["attemptStartTime"] = "2026-11-28T11:50:00Z"
        delays.append(backoff_of(reconcile(body, obs(pods, [svc(body, 0)]))))
    assert delays[0] != delays[1]


def test_defect3_queue_name_must_be_a_label_value():
    plan = reconcile(job(queueName="team a"), obs())
    assert plan.status["phase"] == "Failed" and "spec.queueName" in plan.status["message"]


def test_defect9_no_service_is_recreated_for_a_finished_gang():
    b = job(status=running_status())
    plan = reconcile(b, obs([pod(b, 0, r, phase="Succeeded", ready=False, exit_code=0) for r in range(3)], []))
    assert plan.status["phase"] == "Succeeded" and creates(plan) == []
