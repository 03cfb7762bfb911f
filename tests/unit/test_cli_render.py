"""Issue 12, kubectl-tj's pure parts: describe's sections, ages, tables, feature detection."""

from __future__ import annotations

import datetime as dt

from trainingjob_operator.cli import commands, render

NOW = dt.datetime(2026, 1, 2, 12, 0, 0, tzinfo=dt.timezone.utc)


def _job(**status):
    return {"metadata": {"name": "j", "namespace": "ns", "creationTimestamp": "2026-01-02T11:00:00Z"},
            "spec": {"nodes": 2, "snapshot": {"uri": "s3://b/p"}, "recovery": {"maxPreemptions": 5}},
            "status": {"phase": "Running", "attempt": 2, **status}}


def _fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def test_issue12_describe_prints_progress_and_goodput_only_when_the_status_has_them():
    plain = render.describe(_job(), [], now=NOW)
    assert "Progress:" not in plain and "Goodput:" not in plain and "Last request:" not in plain
    later = _job(progress={"step": 50, "totalSteps": 200, "percent": 25, "stepsPerSecond": 2.5, "eta": "1m",
                           "updatedAt": "2026-01-02T11:59:50Z", "newField": 7},
                 goodput={"percent": 91.5, "productiveSeconds": 900, "lostSeconds": 84},
                 snapshot={"lastRequest": {"value": "r1", "step": 45, "completedAt": "2026-01-02T11:58:00Z"}})
    text = render.describe(later, [], now=NOW)
    f = _fields(text)
    assert "Progress:" in text and f["Total steps"] == "200" and f["Steps per second"] == "2.5"
    assert f["newField"] == "7"  # fields added later still show
    assert "Goodput:" in text and f["Productive seconds"] == "900" and f["Lost seconds"] == "84"
    assert "Last request:" in text and f["Value"] == "r1"


def test_issue12_describe_shows_disruption_lost_work_and_events_oldest_first():
    job = _job(restarts={"preemptions": 2, "failures": 0}, lostWork={"steps": 7, "seconds": 3.5},
               lastDisruption={"kind": "Preemption", "reason": "NodeLost", "pod": "j-1-0", "node": "n1",
                               "attempt": 1, "step": 40, "at": "2026-01-02T11:50:00Z"})
    events = [{"reason": "Second", "type": "Normal", "message": "b", "lastTimestamp": "2026-01-02T11:55:00Z",
               "metadata": {"resourceVersion": "3"}},
              {"reason": "First", "type": "Warning", "message": "a\nmore", "lastTimestamp": "2026-01-02T11:50:00Z",
               "count": 2, "metadata": {"resourceVersion": "9"}}]
    text = render.describe(job, events, now=NOW)
    f = _fields(text)
    assert f["Restarts"] == "2 preemption(s) (max 5), 0 failure(s) (max -)"
    assert f["What"] == "Preemption NodeLost: pod j-1-0 on node n1, attempt 1, at step 40"
    assert f["At"] == "2026-01-02T11:50:00Z (10m ago)" and f["Lost work"] == "7 step(s), 3.5 s (cumulative)"
    assert "Pods: <none>" in text
    assert "Pods: (not allowed to list pods)" in render.describe(job, [], now=NOW, pods=None)
    events_text = text.split("Events:", 1)[1]
    assert events_text.index("First") < events_text.index("Second") and "a more (x2)" in events_text


def test_issue12_ages_like_kubectl():
    assert [render.human_duration(s) for s in (5, 119, 150, 700, 3 * 3600 + 60, 30 * 3600, 3 * 86400 + 3600)] == [
        "5s", "119s", "2m30s", "11m", "3h1m", "30h", "3d1h"]
    assert render.human_bytes(512) == "512B" and render.human_bytes(3 * 1024 * 1024) == "3.0MiB"


def test_issue12_on_demand_snapshots_are_detected_from_the_crd_status_schema():
    assert not commands.snapshot_requests_served(None)
    assert not commands.snapshot_requests_served({"properties": {"snapshot": {"properties": {"latest": {}}}}})
    assert commands.snapshot_requests_served({"properties": {"snapshot": {"properties": {"lastRequest": {}}}}})


def test_issue12_snapshot_command_waits_for_last_request_of_its_own_value():
    import pytest

    from trainingjob_operator.cli.api import CliError

    assert commands.request_outcome(_job(), "v1") == (False, "waiting for the operator to relay it")
    relayed = _job(snapshot={"request": {"value": "v1"}, "lastRequest": {"value": "v0", "completedAt": "t0"}})
    assert commands.request_outcome(relayed, "v1") == (
        False, "relayed to the job's S3 folder; waiting for the gang to take it")
    done = _job(snapshot={"lastRequest": {"value": "v1", "step": 12, "completedAt": "t1", "snapshot": "s3://b/s"}})
    assert commands.request_outcome(done, "v1") == (True, "snapshot v1 complete at step 12 (t1): s3://b/s")
    for status, needle in (({"phase": "Succeeded"}, "is Succeeded: no gang is running"),
                           ({"snapshot": {"requestError": "cannot write ...: AccessDenied"}}, "AccessDenied")):
        with pytest.raises(CliError, match=needle):
            commands.request_outcome(_job(**status), "v1")
    a, b = commands.new_request_value(NOW), commands.new_request_value(NOW)
    assert a.startswith("cli-20260102T120000-") and a != b
