"""Defects 12 and 13 in the pure reconcile: refused creates and kept final states are inputs."""

from __future__ import annotations

from trainingjob_operator.classify import PREEMPTION
from trainingjob_operator.reconcile import CreateError, reconcile
from trainingjob_trainer import contract

from .test_reconcile import NOW, creates, job, obs, pod


def _refused(status: int, attempt: int = 0) -> CreateError:
    return CreateError(kind="Pod", name="mnist-0-0", status=status, attempt=attempt,
                       message=f"the API server rejected Pod mnist-0-0: {status} X: no")


def test_defect12_invalid_create_ends_the_job_invalid_spec_in_reconcile():
    body = job(status={"attempt": 0, "phase": "Pending", "restarts": {"preemptions": 0, "failures": 0}})
    plan = reconcile(body, obs(create_error=_refused(422)))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert "the API server rejected Pod mnist-0-0: 422" in plan.status["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidSpec")]
    assert creates(plan) == []


def test_defect12_forbidden_create_is_a_warning_and_a_retry():
    body = job(status={"attempt": 0, "phase": "Pending", "restarts": {"preemptions": 0, "failures": 0}})
    plan = reconcile(body, obs(create_error=_refused(403)))
    assert plan.status.get("phase") != "Failed"
    assert ("Warning", "CreateFailed") in [(e.type, e.reason) for e in plan.events]
    assert creates(plan, "Pod") == ["mnist-0-0", "mnist-0-1", "mnist-0-2"]


def test_defect12_refusal_of_an_earlier_attempt_is_ignored():
    body = job(status={"attempt": 1, "phase": "Restarting", "restarts": {"preemptions": 1, "failures": 0}})
    plan = reconcile(body, obs(create_error=_refused(422, attempt=0)))
    assert plan.status.get("phase") != "Failed"


def test_defect13_step_read_from_kept_final_states_of_deleted_pods():
    """The gang's pods are gone from the cache; their final states came from the watch."""
    status = {"attempt": 1, "gangCreated": False, "phase": "Restarting",
              "restarts": {"preemptions": 1, "failures": 0}, "lostWork": {"steps": 0, "seconds": 0},
              "lastDisruption": {"kind": PREEMPTION, "reason": "PreemptionByScheduler", "attempt": 0,
                                 "pod": "mnist-0-1", "at": "2026-11-28T11:59:00Z"}}
    body = job(status=status)
    msg = contract.format_termination_message(contract.TerminationMessage(
        reason=contract.TERM_REASON_PREEMPTED, step=7))
    finished = tuple(pod(body, 0, r, phase="Failed", ready=False, exit_code=83, message=msg) for r in range(3))
    plan = reconcile(body, obs(finished_pods=finished))
    assert plan.status["lastDisruption"]["step"] == 7
    assert plan.status["lostWork"]["steps"] == 7
    assert creates(plan, "Pod") == ["mnist-1-0", "mnist-1-1", "mnist-1-2"]


def test_defect13_final_states_are_kept_bounded_and_per_attempt():
    from trainingjob_operator import handlers

    ctl = handlers.Controller()
    body = job(status={"attempt": 0})
    key = ("ml", "mnist")
    running = pod(body, 0, 0)
    ctl.note_pod(key, running)
    assert ctl.finished == {}  # not terminated: nothing kept
    for attempt in range(3):
        for rank in range(3):
            ctl.note_pod(key, pod(body, attempt, rank, phase="Failed", ready=False, exit_code=83, message="x"))
    kept = ctl.finished_pods(key, "uid-1", attempt=2)
    assert sorted(p["metadata"]["name"] for p in kept) == [f"mnist-{a}-{r}" for a in (1, 2) for r in range(3)]
    assert ctl.finished_pods(key, "another-uid", attempt=2) == ()  # a re-created job of the same name
    slim = kept[0]
    assert set(slim) == {"metadata", "spec", "status"} and "env" not in str(slim)
    for i in range(handlers.MAX_FINISHED_PER_JOB + 10):
        ctl.note_pod(key, pod(body, 2, i, phase="Failed", ready=False, exit_code=1))
    assert len(ctl.finished[key]) == handlers.MAX_FINISHED_PER_JOB
