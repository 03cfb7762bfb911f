"""The operator's Prometheus endpoint, scraped while a job is preempted.

The operator runs with ``--metrics-port`` (what the chart's
``metrics.enabled`` sets); the test scrapes ``/metrics`` before and after a
preemption and sees the counters move: preemptions and restarts +1, failures
unchanged, jobs by phase, the latest snapshot step read from S3, the
reconcile histogram, and the per-job series removed when the job is deleted.
Kopf's health endpoint (the chart's probes) answers on ``--health-port``.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from localcluster import control
from trainingjob_trainer.s3 import filesystem
from trainingjob_trainer.store import SnapshotStore, new_save_id

from .helpers import TJ, job_manifest, wait_phase, wait_status

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_scrape(port: int, pred: Callable[[Samples], bool], what: str, timeout: float = 30.0) -> Samples:
    deadline = time.monotonic() + timeout
    last: Samples = {}
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
        except OSError:
            last = {}
        if pred(last):
            return last
        time.sleep(0.2)
    shown = {k: v for k, v in last.items() if k[0].startswith("trainingjob_") and "bucket" not in k[0]}
    raise AssertionError(f"timed out waiting for metrics: {what}; last scrape: {shown}")


def put_complete_snapshot(cluster, root: str, step: int) -> None:
    """A committed snapshot folder (one object + commit marker), as the trainer writes it."""
    opts = cluster.s3_storage_options()
    store = SnapshotStore(root, storage_options=opts)
    uri = store.begin(epoch=0, step=step)
    fs, path = filesystem(uri, opts)
    fs.pipe_file(f"{path}/0.distcp", b"\0" * 64)
    store.commit(epoch=0, step=step, save_id=new_save_id(0), attempt=0, backend="dcp", seconds=0.1)


@pytest.mark.timeout(180)
def test_metrics_move_when_a_job_is_preempted(cluster, kube, namespace, start_operator):
    cluster.create_s3_secret(namespace)
    base = f"s3://{cluster.bucket}/metrics"
    put_complete_snapshot(cluster, f"{base}/{namespace}/pre", step=40)

    port, health = free_port(), free_port()
    start_operator(["--metrics-port", str(port), "--health-port", str(health), "--resync-seconds", "1"])
    job = {"namespace": namespace, "job": "pre"}
    code = "import os,time; time.sleep(30 if os.environ['TJ_ATTEMPT']=='0' else 2)"
    kube.create(TJ, job_manifest("pre", namespace, code, nodes=2,
                                 snapshot={"uri": base, "endpoint": cluster.s3_endpoint, "credentialsSecret": "s3-creds"},
                                 recovery={"maxPreemptions": 5, "backoffSeconds": 1}), namespace=namespace)
    wait_status(kube, namespace, "pre", lambda s: s.get("phase") == "Running" and s.get("attempt") == 0,
                timeout=60, what="attempt 0 running")

    before = wait_scrape(port, lambda m: value(m, "trainingjob_jobs", phase="Running") == 1
                         and value(m, "trainingjob_latest_snapshot_step", **job) == 40,
                         "job Running with snapshot step 40")
    assert value(before, "trainingjob_preemptions_total", **job) == 0
    assert value(before, "trainingjob_restarts_total", **job) == 0
    assert value(before, "trainingjob_failures_total", **job) == 0
    saved_at = value(before, "trainingjob_latest_snapshot_timestamp_seconds", **job)
    assert saved_at is not None and abs(time.time() - saved_at) < 120
    assert value(before, "trainingjob_reconcile_duration_seconds_count", **{}) > 0
    assert value(before, "trainingjob_events_total", reason="GangCreated") >= 1

    # Kopf's health endpoint, which the chart's liveness/readiness probes call.
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as resp:
        assert resp.status == 200

    control.preempt(kube, namespace, "pre-0-1", grace_period=1)
    after = wait_scrape(port, lambda m: value(m, "trainingjob_preemptions_total", **job) == 1
                        and value(m, "trainingjob_restarts_total", **job) == 1,
                        "preemptions and restarts +1")
    assert value(after, "trainingjob_failures_total", **job) == 0
    assert value(after, "trainingjob_events_total", reason="Preempted") >= 1
    assert value(after, "trainingjob_lost_work_steps", **job) is not None
    assert (value(after, "trainingjob_reconcile_duration_seconds_count")
            > value(before, "trainingjob_reconcile_duration_seconds_count"))

    st = wait_phase(kube, namespace, "pre", "Succeeded", timeout=60)
    assert st["restarts"] == {"preemptions": 1, "failures": 0}
    done = wait_scrape(port, lambda m: value(m, "trainingjob_jobs", phase="Succeeded") == 1,
                       "job counted as Succeeded")
    assert value(done, "trainingjob_jobs", phase="Running") == 0
    assert value(done, "trainingjob_preemptions_total", **job) == 1  # a counter never goes back

    kube.delete(TJ, "pre", namespace=namespace)
    gone = wait_scrape(port, lambda m: value(m, "trainingjob_preemptions_total", **job) is None,
                       "per-job series removed after delete")
    assert value(gone, "trainingjob_jobs", phase="Succeeded") == 0


@pytest.mark.timeout(60)
def test_readiness_is_its_own_endpoint_not_liveness(start_operator):
    """The chart's readiness probe (/readyz, --ready-port) is true once the API server answered."""
    ready, health = free_port(), free_port()
    start_operator(["--ready-port", str(ready), "--health-port", str(health)], name="ready")

    def get(port: int, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and get(ready, "/readyz") != 200:
        time.sleep(0.2)
    assert get(ready, "/readyz") == 200
    assert get(ready, "/healthz") == 404  # two endpoints, two ports
    while time.monotonic() < deadline and get(health, "/healthz") != 200:
        time.sleep(0.2)
    assert get(health, "/healthz") == 200
