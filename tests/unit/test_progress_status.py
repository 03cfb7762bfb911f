"""Issue 12, item 1 (operator side): status.progress and status.goodput from the trainer's progress object."""

from __future__ import annotations

import copy
import datetime as dt

from trainingjob_operator.progress_status import Run, ended_attempt_seconds, update
from trainingjob_operator.reconcile import SnapshotState, reconcile
from trainingjob_trainer import contract

from .test_reconcile import job, obs, pod, svc

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def progress(*, attempt=0, step, start=0, first=0.0, wall, stalled=0.0, rate=None, total=None) -> contract.Progress:
    """A progress object as the trainer writes it (first step boundary ``first`` s after T0)."""
    return contract.Progress(attempt=attempt, step=step, epoch=0, start_step=start, total_steps=total,
                             wall_seconds=wall, steps_per_second=rate, window_seconds=min(wall, 60.0),
                             stalled_seconds=stalled, first_step_at=at(first), updated_at=at(first + wall))


def test_issue12_item1_progress_percent_and_eta_from_the_progress_object():
    status = {"attempt": 0, "phase": "Running", "attemptStartTime": at(-5)}
    update(status, progress=progress(step=41, wall=20.0, rate=2.0, total=201))
    p = status["progress"]
    assert (p["step"], p["totalSteps"], p["stepsPerSecond"]) == (41, 201, 2.0)
    assert p["percent"] == 20.4  # 100 * 41 / 201
    assert p["eta"] == "2026-11-28T12:01:40Z"  # updatedAt 12:00:20 + 160 steps / 2 per s
    assert p["updatedAt"] == at(20.0)


def test_issue12_item1_no_total_no_percent_nor_eta():
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=10, wall=5.0, rate=2.0))
    assert "percent" not in status["progress"] and "eta" not in status["progress"]
    assert status["progress"]["step"] == 10


def test_issue12_item1_goodput_of_a_preempted_and_resumed_job():
    """Attempt 0 trains, is preempted, attempt 1 resumes from step 30: every term by hand."""
    status = {"attempt": 0, "phase": "Running"}
    # Attempt 0: 40 steps after its first boundary in 40 s, 4 of them stalled in snapshot code.
    update(status, progress=progress(step=41, wall=40.0, stalled=4.0, rate=1.0, total=100))
    assert status["goodput"]["productiveSeconds"] == 36.0 and status["goodput"]["lostSeconds"] == 4.0
    # Preempted, observed at T0+50 s; reconcile moves to attempt 1 (the object in S3 is still attempt 0's).
    status.update(attempt=1, phase="Restarting",
                  lastDisruption={"kind": "Preemption", "attempt": 0, "at": "2026-11-28T12:00:50Z"})
    update(status, progress=progress(step=41, wall=40.0, stalled=4.0, rate=1.0, total=100))
    assert "progress" not in status, "the ended attempt's progress is not the current attempt's"
    assert status["goodputLedger"]["endedAttempt"]["attempt"] == 0
    # Attempt 1 resumed from the snapshot at step 30; first step boundary at T0+70 s, then 20 s more.
    status["phase"] = "Running"
    update(status, progress=progress(attempt=1, step=51, start=30, first=70.0, wall=20.0, stalled=2.0, rate=1.0,
                                     total=100))
    g = status["goodput"]
    # Attempt 0: 0.9 s per step (36 active s / 40 steps); its span to the disruption is 50 s, 46 s active.
    # Kept: steps 2..30 (29 steps) = 26.1 s; re-done: 46 - 26.1 = 19.9 s. Recovery: 50 s -> 70 s = 20 s.
    # Attempt 1 (running): 18 s active, 2 s stalled.
    assert g["redoneSeconds"] == 19.9 and g["recoverySeconds"] == 20.0 and g["stalledSeconds"] == 6.0
    assert g["productiveSeconds"] == 44.1 and g["lostSeconds"] == 45.9
    assert g["percent"] == 49.0
    # Productive + lost covers the whole time from the first step to the last progress, once.
    assert g["productiveSeconds"] + g["lostSeconds"] == 90.0
    assert "endedAttempt" not in status["goodputLedger"] and status["progress"]["attempt"] == 1


def test_issue12_item1_the_ended_attempts_late_write_refines_its_accounting():
    """Attempt 0's last write (step 45) is read only after the attempt moved on."""
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=41, wall=40.0))
    status.update(attempt=1, lastDisruption={"attempt": 0, "at": "2026-11-28T12:00:50Z"})
    update(status, progress=progress(step=45, wall=44.0))
    assert "progress" not in status
    assert status["goodputLedger"]["endedAttempt"]["run"]["step"] == 45


def test_issue12_item1_an_attempt_that_never_trained_is_recovery_time():
    """Attempt 1 dies before its first step; attempt 2 trains: the gap runs from the first disruption."""
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=11, wall=10.0))
    status.update(attempt=1, lastDisruption={"attempt": 0, "at": at(10.0)})
    update(status, progress=None)
    status.update(attempt=2, lastDisruption={"attempt": 1, "at": at(30.0)})
    update(status, progress=None)
    assert status["goodputLedger"]["endedAttempt"]["endedAt"] == at(10.0)
    update(status, progress=progress(attempt=2, step=12, start=11, first=45.0, wall=0.0))
    g = status["goodput"]
    assert g["recoverySeconds"] == 35.0 and g["redoneSeconds"] == 0.0 and g["productiveSeconds"] == 10.0


def test_issue12_item1_update_is_idempotent():
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=41, wall=40.0, rate=1.0, total=100))
    status.update(attempt=1, lastDisruption={"attempt": 0, "at": at(50.0)})
    p1 = progress(attempt=1, step=51, start=30, first=70.0, wall=20.0, rate=1.0, total=100)
    update(status, progress=p1)
    once = copy.deepcopy(status)
    update(status, progress=p1)
    assert status == once


def test_issue12_item1_a_finished_job_accounts_its_last_ended_attempt():
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=21, wall=20.0))
    status.update(attempt=1, phase="Failed", lastDisruption={"attempt": 0, "at": at(25.0)})
    update(status, progress=None)
    g = status["goodput"]
    assert "endedAttempt" not in status["goodputLedger"]
    assert g["productiveSeconds"] == 20.0 and g["percent"] == 100.0


def test_issue12_item1_unusable_progress_objects_never_reach_status():
    nan = contract.Progress.from_json('{"version": 1, "attempt": 0, "step": 10, "wallSeconds": NaN, '
                                      '"stepsPerSecond": Infinity, "updatedAt": "2026-11-28T12:00:00Z"}')
    assert nan is not None  # the contract parser takes it: the operator must refuse it
    negative = progress(step=-3, wall=5.0)
    huge = progress(step=2**60, wall=5.0)
    zero_total = progress(step=10, wall=5.0, total=0)
    bad_time = contract.Progress(attempt=0, step=1, epoch=0, start_step=0, total_steps=None, wall_seconds=1.0,
                                 steps_per_second=None, window_seconds=1.0, stalled_seconds=0.0,
                                 first_step_at="yesterday", updated_at="now")
    naive = contract.Progress.from_json('{"version": 1, "attempt": 0, "step": 10, "wallSeconds": 1.0, '
                                        '"updatedAt": "2026-11-28T12:00:00", "firstStepAt": "2026-11-28T11:59:59"}')
    ages = progress(step=10, wall=5.0, stalled=1e12)
    for p in (nan, negative, huge, zero_total, bad_time, naive, ages, None):
        status = {"attempt": 0, "phase": "Running"}
        update(status, progress=p)
        assert "progress" not in status and "goodput" not in status, p


def test_issue12_item1_progress_left_by_an_earlier_job_of_the_same_name_is_ignored():
    """The folder is per namespace/name: a re-created job must not show the old job's attempt 0."""
    status = {"attempt": 0, "phase": "Running", "attemptStartTime": at(3600.0)}
    update(status, progress=progress(step=41, wall=40.0))
    assert "progress" not in status


def test_issue12_item1_ended_attempt_seconds_keeps_steps_past_the_last_read():
    """An emergency snapshot past the last progress read keeps those steps' time (from the tail)."""
    run = Run(start_step=0, step=11, wall_seconds=10.0, stalled_seconds=0.0, first_step_at=T0)
    out = ended_attempt_seconds(run, ended_at=T0 + dt.timedelta(seconds=15), next_start_step=16,
                                next_first_step_at=T0 + dt.timedelta(seconds=25))
    assert out == {"productiveSeconds": 15.0, "redoneSeconds": 0.0, "recoverySeconds": 10.0, "stalledSeconds": 0.0}


def test_issue12_item1_reconcile_shows_the_current_attempts_progress_only():
    body = job(status={"attempt": 1, "phase": "Running", "gangCreated": True, "attemptStartTime": at(-10),
                       "restarts": {"preemptions": 1, "failures": 0}})
    pods = [pod(body, 1, r) for r in range(3)]
    current = progress(attempt=1, step=31, start=20, wall=10.0, rate=1.0, total=100)
    plan = reconcile(body, obs(pods, [svc(body, 1)], snapshots=SnapshotState(progress=current, progress_etag="e1")))
    assert plan.status["progress"]["step"] == 31 and plan.status["progress"]["percent"] == 31.0
    old = progress(attempt=0, step=55, wall=50.0, rate=1.0, total=100)
    plan = reconcile(body, obs(pods, [svc(body, 1)], snapshots=SnapshotState(progress=old, progress_etag="e0")))
    assert "progress" not in plan.status



def test_issue12_item1_spec_progress_seconds_reaches_the_pods_env():
    from trainingjob_operator import builders
    from trainingjob_operator.model import parse_spec

    def env(body):
        p = builders.get_pod(body, parse_spec(body["spec"]), attempt=0, rank=0, resume_from=None)
        return {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}

    body = job()
    assert contract.ENV_PROGRESS_SECONDS not in env(body)  # the trainer's default
    body["spec"]["snapshot"]["progressSeconds"] = 2
    assert env(body)[contract.ENV_PROGRESS_SECONDS] == "2"


def test_issue12_item1_a_rate_that_gives_no_sensible_eta_shows_none():
    status = {"attempt": 0, "phase": "Running"}
    update(status, progress=progress(step=10, wall=5.0, rate=1e-300, total=100))
    assert status["progress"]["percent"] == 10.0 and "eta" not in status["progress"]
