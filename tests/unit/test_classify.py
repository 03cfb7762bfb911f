"""The classification rule table (issue 9, defect 5): every built-in rule, and user rules.

Each row is a pod as the kubelet / node lifecycle controller / scheduler
leaves it, with the message texts the real components write.
"""

from __future__ import annotations

import datetime as dt

import pytest

from trainingjob_operator.classify import (
    BUILTIN_RULES, FAIL_JOB, FAILURE, PREEMPTION, SUCCESS, TRANSIENT, PodView, classify, rules_from_spec,
)
from trainingjob_operator.model import SpecError, parse_spec
from trainingjob_trainer import contract

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def pod(phase="Failed", *, exit_code=None, term_reason=None, message=None, reason=None, pod_message=None,
        conditions=(), waiting=None, deleting=False):
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "False"}, *conditions]}
    if reason:
        status["reason"] = reason
    if pod_message:
        status["message"] = pod_message
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": term_reason or ("Completed" if exit_code == 0 else "Error"),
                "finishedAt": "2026-11-28T11:59:00Z"}
        if message:
            term["message"] = message
        status["containerStatuses"] = [{"name": contract.CONTAINER_NAME, "state": {"terminated": term}}]
    elif waiting:
        status["containerStatuses"] = [{"name": contract.CONTAINER_NAME, "state": {"waiting": waiting}}]
    meta = {"name": "job-0-1", "labels": {contract.LABEL_ATTEMPT: "0", contract.LABEL_NODE_RANK: "1"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-28T11:59:30Z"
    return PodView.from_pod({"metadata": meta, "spec": {"nodeName": "n1"}, "status": status})


def disruption(reason, message=""):
    return {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}


def outcome(p, rules=()):
    return classify(p, nodes=None, now=NOW, node_not_ready_seconds=60, rules=rules)


PREEMPTED_MSG = contract.format_termination_message(contract.TerminationMessage(
    reason=contract.TERM_REASON_PREEMPTED, step=7, snapshot="s3://b/p/epoch_0_train_step_7", save_seconds=1.25))

# (id, pod, expected kind, expected reason, text the message must contain)
TABLE = [
    ("exit84_snapshot_storage", pod(exit_code=contract.EXIT_SNAPSHOT_CONFIG_ERROR), FAIL_JOB,
     "SnapshotStorageError", "restarting will not help"),
    ("evicted_over_ephemeral_limit", pod(reason="Evicted", pod_message=(
        'Pod ephemeral local storage usage exceeds the total limit of containers 1Gi. ')), FAILURE,
     "EvictedOverLimit", "raise spec.resources"),
    ("evicted_container_over_limit", pod(reason="Evicted", pod_message=(
        'Container trainer exceeded its local ephemeral storage limit "1Gi". ')), FAILURE, "EvictedOverLimit", ""),
    ("evicted_emptydir_over_limit", pod(reason="Evicted", pod_message=(
        'Usage of EmptyDir volume "scratch" exceeds the limit "1Gi". ')), FAILURE, "EvictedOverLimit", ""),
    ("evicted_node_pressure_over_request", pod(reason="Evicted", pod_message=(
        "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. "
        "Container trainer was using 3Gi, request is 1Gi, has larger consumption of memory. ")), FAILURE,
     "EvictedOverLimit", ""),
    ("kubelet_disruption_over_limit_while_running", pod(phase="Running", conditions=[disruption(
        "TerminationByKubelet", 'Container trainer exceeded its local ephemeral storage limit "1Gi". ')]),
     FAILURE, "EvictedOverLimit", ""),
    ("evicted_node_pressure_within_request", pod(reason="Evicted", pod_message=(
        "The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi, available: 100Mi. ")),
     PREEMPTION, "Evicted", ""),
    ("disruption_target_preemption", pod(phase="Running", conditions=[disruption(
        "PreemptionByScheduler", "Preempted by pod abc on node n1")]), PREEMPTION, "PreemptionByScheduler",
     "Preempted by pod"),
    ("disruption_target_taint_manager", pod(phase="Running", conditions=[disruption("DeletionByTaintManager")]),
     PREEMPTION, "DeletionByTaintManager", ""),
    ("kueue_stopped", pod(phase="Running", conditions=[{
        "type": "TerminationTarget", "status": "True", "reason": "StoppedByKueue",
        "message": "Preempted to accommodate a higher priority Workload"}]), PREEMPTION, "StoppedByKueue",
     "higher priority"),
    ("oomkilled", pod(exit_code=137, term_reason="OOMKilled"), FAILURE, "OOMKilled",
     "exceeding its memory limit"),
    ("pod_reason_shutdown", pod(reason="Terminated", pod_message="Pod was terminated in response to imminent node "
                                                                 "shutdown."), PREEMPTION, "Terminated", ""),
    ("pod_reason_node_lost", pod(reason="NodeLost"), PREEMPTION, "NodeLost", ""),
    ("admission_out_of_gpu", pod(reason="OutOfnvidia.com/gpu", pod_message=(
        "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu, requested: 8, used: 8, capacity: 8")),
     TRANSIENT, "OutOfnvidia.com/gpu", "not counted as a failure"),
    ("admission_out_of_cpu", pod(reason="OutOfcpu"), TRANSIENT, "OutOfcpu", ""),
    ("admission_unexpected", pod(reason="UnexpectedAdmissionError", pod_message=(
        "Allocate failed due to no healthy devices present; cannot allocate unhealthy devices nvidia.com/gpu")),
     TRANSIENT, "UnexpectedAdmissionError", "admission"),
    ("container_status_unknown", pod(exit_code=137, term_reason="ContainerStatusUnknown",
                                     message="The container could not be located when the pod was terminated"),
     PREEMPTION, "ContainerStatusUnknown", "node"),
    ("trainer_preempted_message", pod(exit_code=1, message=PREEMPTED_MSG), PREEMPTION,
     contract.TERM_REASON_PREEMPTED, "emergency snapshot"),
    ("exit83_preempted", pod(exit_code=contract.EXIT_PREEMPTED_AFTER_SNAPSHOT), PREEMPTION,
     contract.TERM_REASON_PREEMPTED, ""),
    ("plain_error", pod(exit_code=1, message="Traceback ... ValueError: bad lr"), FAILURE, "Error", "bad lr"),
    ("deleted_by_someone", pod(phase="Running", deleting=True), PREEMPTION, "DeletedExternally", ""),
    ("succeeded", pod(phase="Succeeded", exit_code=0), SUCCESS, "Completed", ""),
]


@pytest.mark.parametrize("name,p,kind,reason,text", TABLE, ids=[t[0] for t in TABLE])
def test_defect5_rule_table(name, p, kind, reason, text):
    o = outcome(p)
    assert o is not None, name
    assert (o.kind, o.reason) == (kind, reason), o
    assert text in o.describe()


def test_defect5_every_builtin_rule_is_exercised_by_the_table():
    """No rule of the table is untested: each one decides at least one row."""
    used = set()
    for _, p, *_ in TABLE:
        for i, rule in enumerate(BUILTIN_RULES):
            if p.phase != "Succeeded" and rule.matches(p) is not None:
                used.add(i)
                break
    assert used == set(range(len(BUILTIN_RULES)))


def test_defect5_running_pod_without_facts_is_undecided():
    assert outcome(pod(phase="Running")) is None


def test_issue8_termination_message_save_seconds_reaches_the_outcome():
    assert outcome(pod(exit_code=1, message=PREEMPTED_MSG)).save_seconds == 1.25


USER_RULES = [
    {"action": "Transient", "reason": "NcclTimeout", "onExitCodes": {"values": [3]}, "onMessage": "NCCL.*timed out"},
    {"action": "Preemption", "onPodCondition": {"type": "DisruptionTarget", "reason": "EvictionByEvictionAPI"},
     "reason": "Drained"},
    {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1, 3, 137]}},
    {"action": "Failure", "onContainerReason": "ContainerStatusUnknown", "reason": "TreatedAsBug"},
    {"action": "Failure", "onPodReason": "OutOf*"},
]


@pytest.mark.parametrize("p,kind,reason", [
    (pod(exit_code=3, message="RuntimeError: NCCL watchdog timed out"), TRANSIENT, "NcclTimeout"),
    (pod(exit_code=3, message="RuntimeError: something else"), FAILURE, "Error"),
    (pod(phase="Running", conditions=[disruption("EvictionByEvictionAPI")]), PREEMPTION, "Drained"),
    (pod(exit_code=2), FAIL_JOB, "ExitCode2"),
    (pod(exit_code=1), FAILURE, "Error"),
    (pod(exit_code=137, term_reason="ContainerStatusUnknown"), FAILURE, "TreatedAsBug"),
    (pod(reason="OutOfcpu"), FAILURE, "OutOfcpu"),
    (pod(phase="Succeeded", exit_code=0), SUCCESS, "Completed"),
], ids=["exit-and-message", "exit-without-message", "condition", "notin", "notin-excluded", "container-reason",
        "pod-reason-prefix", "exit0-never"])
def test_defect5_user_rules_come_before_the_builtin_table(p, kind, reason):
    spec = parse_spec({"image": "i", "command": ["torchrun"], "recovery": {"rules": USER_RULES}})
    o = outcome(p, spec.recovery.rules)
    assert (o.kind, o.reason) == (kind, reason)


@pytest.mark.parametrize("rule,text", [
    ({"action": "Failure", "onMessage": "("}, "not a valid regular expression"),
    ({"action": "Failure"}, "has no matcher"),
    ({"action": "Retry", "onPodReason": "X"}, "action must be one of"),
])
def test_defect5_bad_user_rules_are_spec_errors(rule, text):
    with pytest.raises(SpecError, match=text):
        parse_spec({"image": "i", "command": ["torchrun"], "recovery": {"rules": [rule]}})


def test_defect5_rules_from_spec_keeps_order():
    rules = rules_from_spec(USER_RULES)
    assert [r.action for r in rules] == [u["action"] for u in USER_RULES]


# ---------------------------------------------------------------- the CRD schema
def _crd_schema():
    from pathlib import Path

    import yaml
    crd = yaml.safe_load((Path(__file__).parents[2] / "charts/trainingjob-operator/crds/trainingjobs.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _admit(spec):
    from localcluster import crdschema
    obj = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": "j"}, "spec": spec}
    return crdschema.process(_crd_schema(), obj)


def test_defect5_crd_schema_admits_user_rules_and_rejects_bad_ones():
    base = {"image": "i", "command": ["torchrun"]}
    ok = _admit({**base, "recovery": {"rules": USER_RULES}})
    assert not ok.errors, [e.message for e in ok.errors]
    assert ok.obj["spec"]["recovery"]["rules"][0]["onExitCodes"]["operator"] == "In"  # defaulted
    for bad in ({"action": "Failure"}, {"action": "Retry", "onPodReason": "X"},
                {"action": "Failure", "onExitCodes": {"values": [0]}},
                {"action": "Failure", "reason": "not camel", "onPodReason": "X"}):
        res = _admit({**base, "recovery": {"rules": [bad]}})
        assert res.errors, bad
    too_many = _admit({**base, "recovery": {"rules": [USER_RULES[0]] * 33}})
    assert too_many.errors


def test_defect6_crd_default_failure_settle_equals_the_operators():
    from trainingjob_operator.model import DEFAULT_FAILURE_SETTLE_SECONDS, NODE_MONITOR_GRACE_SECONDS
    defaulted = _admit({"image": "i", "command": ["torchrun"]}).obj["spec"]["recovery"]
    assert defaulted["failureSettleSeconds"] == DEFAULT_FAILURE_SETTLE_SECONDS == parse_spec(
        {"image": "i", "command": ["t"]}).recovery.failure_settle_seconds
    assert DEFAULT_FAILURE_SETTLE_SECONDS > NODE_MONITOR_GRACE_SECONDS + 5  # grace + monitor period


def test_defect5_examples_pass_the_crd_schema_and_the_operators_checks():
    from pathlib import Path

    import yaml

    from trainingjob_operator.model import validate
    for path in sorted((Path(__file__).parents[2] / "examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        res = _admit(body["spec"])
        assert not res.errors, (path.name, [e.message for e in res.errors])
        assert validate(body["metadata"]["name"], parse_spec(res.obj["spec"])) == [], path.name
