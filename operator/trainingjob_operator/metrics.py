"""Prometheus metrics of the operator (prometheus-client).

Served on ``--metrics-port`` (0 disables). Per-job gauges carry the labels
``namespace`` and ``job``; they are removed when the job is deleted.
"""

from __future__ import annotations

import http.server
import threading
from typing import Any, Callable, Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")

JOBS_BY_PHASE = Gauge("trainingjob_jobs", "TrainingJobs by phase", ["phase"])
PREEMPTIONS = Counter("trainingjob_preemptions_total", "Attempts ended by a preemption/disruption",
                      ["namespace", "job"])
FAILURES = Counter("trainingjob_failures_total", "Attempts ended by a training process failure",
                   ["namespace", "job"])
RESTARTS = Counter("trainingjob_restarts_total", "Gang restarts (new attempts) of all causes", ["namespace", "job"])
SNAPSHOT_STEP = Gauge("trainingjob_latest_snapshot_step", "Train step of the newest complete snapshot",
                      ["namespace", "job"])
SNAPSHOT_TIME = Gauge("trainingjob_latest_snapshot_timestamp_seconds",
                      "Unix time the newest complete snapshot was saved (age = time() - this)", ["namespace", "job"])
LOST_STEPS = Gauge("trainingjob_lost_work_steps", "Train steps redone because of disruptions, cumulative",
                   ["namespace", "job"])


def _job_gauge(name: str, documentation: str) -> Gauge:
    """A per-job gauge (labels ``namespace``, ``job``)."""
    return Gauge(name, documentation, ["namespace", "job"])


SNAPSHOT_SAVE_SECONDS = _job_gauge("trainingjob_latest_snapshot_save_seconds",
                                   "Wall seconds the newest complete snapshot took to save")
JOB_PHASE = Gauge("trainingjob_job_phase", "1 for the job's current phase, 0 for the others",
                  ["namespace", "job", "phase"])
PROGRESS_STEP = _job_gauge("trainingjob_progress_step", "Last train step the current attempt reported")
PROGRESS_TOTAL = _job_gauge("trainingjob_progress_total_steps", "The run's total train steps (when known)")
PROGRESS_PERCENT = _job_gauge("trainingjob_progress_percent", "Percent of the total train steps done")
PROGRESS_RATE = _job_gauge("trainingjob_progress_steps_per_second", "Train steps per second over the trainer's window")
PROGRESS_ETA = _job_gauge("trainingjob_progress_eta_timestamp_seconds",
                          "Unix time the last step is expected (remaining = this - time())")
GOODPUT_PERCENT = _job_gauge("trainingjob_goodput_percent", "Productive share of the job's training time, percent")
GOODPUT_PRODUCTIVE = _job_gauge("trainingjob_goodput_productive_seconds", "Training seconds whose steps were kept")
GOODPUT_LOST = _job_gauge("trainingjob_goodput_lost_seconds",
                          "Seconds lost: re-done steps + disruption to next first step + snapshot stalls")
RECONCILE_SECONDS = Histogram("trainingjob_reconcile_duration_seconds", "Duration of one reconcile pass",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
EVENTS = Counter("trainingjob_events_total", "Events posted by the operator, by reason", ["reason"])
ENQUEUES = Counter("trainingjob_operator_enqueues_total",
                   "Job keys added to the work queue, by source (event, node, resync, requeue)", ["source"])

_phase_of: dict[tuple[str, str], str] = {}
_seen_restarts: dict[tuple[str, str], tuple[int, int]] = {}


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def serve_readiness(port: int, ready: Callable[[], bool]) -> None:
    """``GET /readyz`` on ``port``: 200 ``ok`` when ``ready()``, else 503 (0: off). A daemon thread."""
    if not port:
        return

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/readyz":
                self.send_error(404)
                return
            ok = ready()
            body = b"ok\n" if ok else b"not ready\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every few seconds: not logged
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="readyz", daemon=True).start()


def count_event(reason: str) -> None:
    EVENTS.labels(reason=reason).inc()


def count_enqueue(source: str) -> None:
    ENQUEUES.labels(source=source).inc()


def _refresh_phases() -> None:
    for phase in PHASES:
        JOBS_BY_PHASE.labels(phase=phase).set(sum(1 for p in _phase_of.values() if p == phase))


def observe_job(body: Mapping[str, Any], status: Mapping[str, Any], seconds: float) -> None:
    RECONCILE_SECONDS.observe(seconds)
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    labels = {"namespace": key[0], "job": key[1]}
    if status.get("phase"):
        _phase_of[key] = status["phase"]
        _refresh_phases()
    restarts = status.get("restarts") or {}
    pre, fail = int(restarts.get("preemptions", 0)), int(restarts.get("failures", 0))
    seen = _seen_restarts.get(key)
    if seen is None:
        # First sight (e.g. after an operator restart): start from the status.
        PREEMPTIONS.labels(**labels).inc(pre)
        FAILURES.labels(**labels).inc(fail)
        RESTARTS.labels(**labels).inc(pre + fail)
    else:
        if pre > seen[0]:
            PREEMPTIONS.labels(**labels).inc(pre - seen[0])
            RESTARTS.labels(**labels).inc(pre - seen[0])
        if fail > seen[1]:
            FAILURES.labels(**labels).inc(fail - seen[1])
            RESTARTS.labels(**labels).inc(fail - seen[1])
    _seen_restarts[key] = (pre, fail)
    latest = (status.get("snapshot") or {}).get("latest") or {}
    if isinstance(latest.get("step"), int):
        SNAPSHOT_STEP.labels(**labels).set(latest["step"])
        from .classify import parse_time

        t = parse_time(latest.get("savedAt"))
        if t is not None:
            SNAPSHOT_TIME.labels(**labels).set(t.timestamp())
    LOST_STEPS.labels(**labels).set(int((status.get("lostWork") or {}).get("steps", 0)))
    if isinstance(latest.get("seconds"), (int, float)):
        SNAPSHOT_SAVE_SECONDS.labels(**labels).set(latest["seconds"])
    if status.get("phase"):
        for phase in PHASES:
            JOB_PHASE.labels(phase=phase, **labels).set(1 if phase == status["phase"] else 0)
    _progress_gauges(labels, status)


#: status.progress / status.goodput field -> its per-job gauge (absent field: the gauge is removed).
_LIVE_GAUGES = (
    ("progress", "step", PROGRESS_STEP), ("progress", "totalSteps", PROGRESS_TOTAL),
    ("progress", "percent", PROGRESS_PERCENT), ("progress", "stepsPerSecond", PROGRESS_RATE),
    ("goodput", "percent", GOODPUT_PERCENT), ("goodput", "productiveSeconds", GOODPUT_PRODUCTIVE),
    ("goodput", "lostSeconds", GOODPUT_LOST),
)


def _progress_gauges(labels: Mapping[str, str], status: Mapping[str, Any]) -> None:
    """The same figures as ``status.progress`` and ``status.goodput`` (none while a restart has no progress yet)."""
    from .classify import parse_time

    values: list[tuple[Gauge, float | None]] = []
    for part, field, gauge in _LIVE_GAUGES:
        v = (status.get(part) or {}).get(field)
        values.append((gauge, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None))
    eta = parse_time((status.get("progress") or {}).get("eta"))
    values.append((PROGRESS_ETA, eta.timestamp() if eta else None))
    for gauge, value in values:
        if value is not None:
            gauge.labels(**labels).set(value)
        else:
            _remove(gauge, labels["namespace"], labels["job"])


def _remove(metric: Any, *labelvalues: str) -> None:
    try:
        metric.remove(*labelvalues)
    except KeyError:
        pass


def forget_job(namespace: str, name: str) -> None:
    key = (namespace, name)
    _phase_of.pop(key, None)
    _seen_restarts.pop(key, None)
    _refresh_phases()
    for metric in (PREEMPTIONS, FAILURES, RESTARTS, SNAPSHOT_STEP, SNAPSHOT_TIME, LOST_STEPS, SNAPSHOT_SAVE_SECONDS,
                   *(g for _, _, g in _LIVE_GAUGES), PROGRESS_ETA):
        _remove(metric, namespace, name)
    for phase in PHASES:
        _remove(JOB_PHASE, namespace, name, phase)
