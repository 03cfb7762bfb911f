"""Issue 12, item 3: Prometheus gauges carry the same progress and goodput figures as the status."""

from __future__ import annotations

from prometheus_client import REGISTRY

from trainingjob_operator import metrics

BODY = {"metadata": {"namespace": "ml", "name": "gauged"}}
LABELS = {"namespace": "ml", "job": "gauged"}


def value(name: str, **extra: str) -> float | None:
    return REGISTRY.get_sample_value(name, {**LABELS, **extra})


def test_issue12_item3_gauges_follow_status_progress_and_goodput():
    status = {"phase": "Running", "attempt": 1,
              "snapshot": {"latest": {"step": 30, "savedAt": "2026-11-28T12:00:00Z", "seconds": 1.25}},
              "progress": {"attempt": 1, "step": 51, "totalSteps": 100, "percent": 51.0, "stepsPerSecond": 2.5,
                           "eta": "2026-11-28T12:00:20Z", "updatedAt": "2026-11-28T12:00:00Z"},
              "goodput": {"percent": 49.0, "productiveSeconds": 44.1, "lostSeconds": 45.9}}
    metrics.observe_job(BODY, status, 0.01)
    assert value("trainingjob_progress_step") == 51 and value("trainingjob_progress_total_steps") == 100
    assert value("trainingjob_progress_percent") == 51.0 and value("trainingjob_progress_steps_per_second") == 2.5
    assert value("trainingjob_progress_eta_timestamp_seconds") == 1795867220.0
    assert value("trainingjob_goodput_percent") == 49.0
    assert value("trainingjob_goodput_productive_seconds") == 44.1 and value("trainingjob_goodput_lost_seconds") == 45.9
    assert value("trainingjob_latest_snapshot_save_seconds") == 1.25
    assert value("trainingjob_job_phase", phase="Running") == 1 and value("trainingjob_job_phase", phase="Failed") == 0

    # A restart: the ended attempt's progress is gone from status, and from the gauges.
    restarting = {**status, "phase": "Restarting", "attempt": 2}
    del restarting["progress"]
    metrics.observe_job(BODY, restarting, 0.01)
    assert value("trainingjob_progress_step") is None and value("trainingjob_progress_eta_timestamp_seconds") is None
    assert value("trainingjob_goodput_percent") == 49.0
    assert value("trainingjob_job_phase", phase="Restarting") == 1 and value("trainingjob_job_phase", phase="Running") == 0

    metrics.forget_job("ml", "gauged")
    assert value("trainingjob_goodput_percent") is None and value("trainingjob_job_phase", phase="Restarting") is None
