"""End to end: real `kopf run`, real torchrun gangs (CPU, gloo), real S3 writes.

The example job (``trainingjob_trainer.example``) runs on the stand-in's node
agent as 2 pods x 2 processes. Preemptions are injected the way Kubernetes
does them; the final weights are compared, bit for bit, with an uninterrupted
run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from localcluster import control
from tests.integration.helpers import TJ, events_of, kubectl_get_tj, pods_of, wait_phase, wait_status

pytestmark = [pytest.mark.slow]

STEPS = 60
EVERY = 10


def example_job(name: str, namespace: str, cluster, weights: Path, *, steps: int = STEPS, sleep: float = 0.15,
                **spec) -> dict:
    body = {
        "apiVersion": "trainingjob.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "local/trainer:dev",
            "command": [sys.executable, "-m", "trainingjob_trainer.launch", "-m", "trainingjob_trainer.example"],
            "args": ["--steps", str(steps), "--sleep-per-step", str(sleep), "--final-weights", str(weights)],
            "nodes": 2,
            "procsPerNode": 2,
            "snapshot": {"uri": f"s3://{cluster.bucket}/e2e", "endpoint": cluster.s3_endpoint,
                         "everySteps": EVERY, "keepLast": 3, "credentialsSecret": "s3-creds"},
            "recovery": {"maxPreemptions": 5, "maxFailures": 0, "nodeNotReadySeconds": 2,
                         "failureSettleSeconds": 20},
            "terminationGracePeriodSeconds": 60,
        },
    }
    body["spec"].update(spec)
    return body


def latest_step(st: dict) -> int:
    return ((st.get("snapshot") or {}).get("latest") or {}).get("step") or 0


def pod_logs(cluster, namespace: str, job: str, attempt: int) -> str:
    root = Path(cluster.state_dir) / "pods" / namespace
    return "".join((d / "trainer.log").read_text() for d in sorted(root.glob(f"{job}-{attempt}-*"))
                   if (d / "trainer.log").exists())


def start_step(cluster, namespace: str, job: str, attempt: int) -> int:
    """The step the gang of ``attempt`` resumed at, as its global rank 0 printed it."""
    m = re.search(r"start_step=(\d+)", pod_logs(cluster, namespace, job, attempt))
    assert m, f"attempt {attempt} printed no start step"
    return int(m.group(1))


def emergency_step(cluster, namespace: str, job: str, attempt: int) -> int:
    """The step of the emergency snapshot the gang of ``attempt`` took, as printed."""
    steps = {int(x) for x in re.findall(r"emergency snapshot at step (\d+)", pod_logs(cluster, namespace, job, attempt))}
    assert len(steps) == 1, f"attempt {attempt}: every rank saves at the same step, got {steps}"
    return steps.pop()


def printed_steps(cluster, namespace: str, job: str, attempt: int) -> list[int]:
    return [int(x) for x in re.findall(r"\[example\] step (\d+)/", pod_logs(cluster, namespace, job, attempt))]


def wait_past_latest_snapshot(cluster, namespace: str, job: str, *, attempt: int, timeout: float = 120) -> int:
    """Wait until the gang printed a step past S3's latest complete snapshot, at least
    3 steps before the next one is due; returns that snapshot's step.

    S3 is read directly (the job's status can lag it), and the printed step
    comes before that step's save, so ``printed - latest <= EVERY - 3`` means
    no newer snapshot can be committed for 3 more steps.
    """
    from trainingjob_trainer import contract
    from trainingjob_trainer.store import SnapshotStore

    store = SnapshotStore(contract.job_snapshot_root(f"s3://{cluster.bucket}/e2e", namespace, job),
                          storage_options=cluster.s3_storage_options())
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        latest = store.latest_complete()
        printed = max(printed_steps(cluster, namespace, job, attempt), default=0)
        last = (latest.step if latest else None, printed)
        if latest is not None and 0 < printed - latest.step <= EVERY - 3:
            return latest.step
        time.sleep(0.05)
    raise AssertionError(f"the gang never got past its latest snapshot in time (latest, printed) = {last}")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a), torch.load(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"tensor {k} differs"


def test_preempted_twice_once_with_operator_killed_between_fencing_and_creating(
        kube, namespace, cluster, start_operator, reference_weights, s3_creds, tmp_path):
    rng = random.Random(int(os.environ.get("E2E_SEED", time.time_ns() % 10_000)))
    weights = tmp_path / "weights.pt"
    op = start_operator(name="operator-a")
    kube.create(TJ, example_job("twice", namespace, cluster, weights), namespace=namespace)

    # Preemption 1: a random worker, at a random point after the first snapshot.
    # Read from S3 and the gang's log, not from the status: under load the
    # status lagged so far that the gang had finished all its steps when the
    # preemption came, and attempt 1 had nothing left to train.
    wait_status(kube, namespace, "twice", lambda s: s.get("phase") == "Running", timeout=180, what="Running")
    wait_past_latest_snapshot(cluster, namespace, "twice", attempt=0, timeout=180)
    time.sleep(rng.uniform(0, 1.5))
    victim = f"twice-0-{rng.randrange(2)}"
    control.preempt(kube, namespace, victim, reason="PreemptionByScheduler", message="e2e preemption 1")
    wait_status(kube, namespace, "twice", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running",
                timeout=180, what="attempt 1 running")

    # Preemption 2 (once attempt 1 is training), and the operator SIGKILLed while it fences attempt 1.
    deadline = time.monotonic() + 120
    while not re.search(r"start_step=\d+.*\n(.*\n)*.*\[example\] step \d+/", pod_logs(cluster, namespace, "twice", 1)):
        assert time.monotonic() < deadline, \
            f"attempt 1 never trained: {pod_logs(cluster, namespace, 'twice', 1)[-2000:]}"
        time.sleep(0.1)
    time.sleep(rng.uniform(0.2, 1.0))
    victim = f"twice-1-{rng.randrange(2)}"
    control.preempt(kube, namespace, victim, reason="EvictionByEvictionAPI", message="e2e preemption 2")
    wait_status(kube, namespace, "twice", lambda s: s.get("attempt") == 2, timeout=30, what="attempt 2 decided")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pods = pods_of(kube, namespace, "twice")
        if all(p["metadata"].get("deletionTimestamp") for p in pods if p["metadata"]["name"].startswith("twice-1-")):
            break
        time.sleep(0.02)
    os.kill(op.pid, signal.SIGKILL)
    assert not [p for p in pods_of(kube, namespace, "twice") if p["metadata"]["name"].startswith("twice-2-")], \
        "the new gang already existed: the operator was not killed between fencing and creating"
    cluster.stop_operator("operator-a")
    time.sleep(1.0)
    start_operator(name="operator-b")

    st = wait_phase(kube, namespace, "twice", "Succeeded", timeout=300)
    assert st["restarts"] == {"preemptions": 2, "failures": 0}
    assert st["lostWork"]["steps"] == 0
    # Ground truth from the trainers' own logs: each new gang started exactly
    # where the previous one's emergency snapshot was taken.
    for attempt in (1, 2):
        assert start_step(cluster, namespace, "twice", attempt) == emergency_step(cluster, namespace, "twice",
                                                                                   attempt - 1)
    assert latest_step(st) == STEPS
    assert st["attempt"] == 2
    assert st["snapshot"]["restoredFrom"].startswith(f"s3://{cluster.bucket}/e2e/{namespace}/twice/epoch_")
    assert st["lastDisruption"]["reason"] in ("EvictionByEvictionAPI", "PreemptedAfterSnapshot")
    assert_same_weights(weights, reference_weights)
    reasons = [e["reason"] for e in events_of(kube, namespace, "twice")]
    assert reasons.count("Preempted") == 2 and "AllWorkersSucceeded" in reasons


class ProgressWatch:
    """The job's ``status.progress`` of one attempt next to the trainer's own log, sampled together.

    Each sample records the wall time and the highest step the attempt's
    ranks printed by then, so a progress object (as of its ``updatedAt``) can be
    compared with what the trainer had really reached at that time.
    """

    def __init__(self, cluster, namespace: str, job: str, *, attempt: int) -> None:
        self.cluster, self.namespace, self.job, self.attempt = cluster, namespace, job, attempt
        self.log: list[tuple[float, int]] = []
        self.seen: list[dict] = []  # distinct status.progress of the attempt, in order

    def sample(self, st: dict) -> dict | None:
        """Record the log and ``st``'s progress; returns the progress when it is this attempt's."""
        self.log.append((time.time(), max(printed_steps(self.cluster, self.namespace, self.job, self.attempt),
                                          default=0)))
        p = st.get("progress") or {}
        if p.get("attempt") != self.attempt:
            return None
        if not self.seen or self.seen[-1]["updatedAt"] != p["updatedAt"]:
            self.seen.append(p)
        return p

    def log_step_at(self, when: str) -> int:
        t = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
        before = [step for at, step in self.log if at <= t]
        assert before, f"no log sample before {when}"
        return before[-1]


def test_node_lost_without_sigterm_resumes_from_periodic_snapshot(
        kube, namespace, cluster, start_operator, reference_weights, s3_creds, tmp_path):
    """Also issue 12, item 6: progress moves while attempt 1 runs, its percent and ETA are right
    within 20% mid-run (against the trainer's log, and the run's real end), the columns show in
    ``kubectl get tj``, and the node loss shows in the goodput."""
    weights = tmp_path / "weights.pt"
    start_operator(["--resync-seconds", "1"], name="operator-c")
    body = example_job("lost", namespace, cluster, weights, sleep=0.3)
    body["spec"]["snapshot"]["progressSeconds"] = 1
    kube.create(TJ, body, namespace=namespace)
    st = wait_status(kube, namespace, "lost", lambda s: s.get("phase") == "Running" and latest_step(s) >= EVERY,
                     timeout=180, what="first snapshot")
    assert latest_step(st) < STEPS - EVERY, "training outran the test"
    # The node is lost once the gang is past its latest complete snapshot (so work is lost)
    # and still well before the next one (so that one cannot commit in between).
    wait_past_latest_snapshot(cluster, namespace, "lost", attempt=0)
    pod = kube.get("pods", "lost-0-1", namespace=namespace)
    node = pod["spec"]["nodeName"]
    control.lose_node(kube, node)  # SIGKILL, no grace, no emergency snapshot
    watch = ProgressWatch(cluster, namespace, "lost", attempt=1)

    def mid_run(s: dict) -> bool:
        # Far enough in for a rate, and at least 15 steps (4.5 s) from the end: an ETA worth checking.
        p = watch.sample(s)
        return bool(p) and p["step"] >= p["startStep"] + 4 and STEPS - p["step"] >= 15 and "eta" in p

    try:
        st = wait_status(kube, namespace, "lost", mid_run, timeout=300, what="attempt 1 mid-run progress")
        mid, (columns,) = st["progress"], kubectl_get_tj(cluster.kubeconfig, namespace)
        st = wait_status(kube, namespace, "lost",
                         lambda s: bool(watch.sample(s)) and s.get("phase") == "Succeeded"
                         and s["progress"]["step"] == STEPS, timeout=300, what="Succeeded with the last progress")
    finally:
        control.restore_node(kube, node)
    # Progress moved while the attempt ran, and never showed attempt 0's.
    steps_seen = [p["step"] for p in watch.seen]
    assert len(steps_seen) >= 3 and steps_seen == sorted(steps_seen), steps_seen
    # Mid-run percent against the step the trainer's log had reached at the progress' updatedAt ...
    true_pct = 100 * watch.log_step_at(mid["updatedAt"]) / STEPS
    assert abs(mid["percent"] - true_pct) <= 0.2 * true_pct, (mid, true_pct)
    # ... and the ETA against the run's real end (the trainer's last progress write).
    eta, end, then = (datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp()
                      for x in (mid["eta"], st["progress"]["updatedAt"], mid["updatedAt"]))
    assert abs(eta - end) <= 0.2 * (end - then), (mid, st["progress"])
    assert columns["STEP"].isdigit() and int(columns["STEP"]) >= mid["step"], columns
    assert float(columns["PROGRESS"]) >= mid["percent"] and columns["ETA"].endswith("Z"), columns
    assert st["progress"]["percent"] == 100.0
    g = st["goodput"]
    (wide,) = kubectl_get_tj(cluster.kubeconfig, namespace, "-o", "wide")
    assert float(wide["GOODPUT"]) == g["percent"] and int(wide["STEP"]) == STEPS, wide
    # The node loss cost re-done steps (at least their 0.3 s sleep each) and a recovery.
    assert 0 < g["percent"] < 100 and g["recoverySeconds"] > 0, g
    assert g["redoneSeconds"] >= 0.8 * 0.3 * st["lostWork"]["steps"], (g, st["lostWork"])
    assert abs(g["lostSeconds"] - (g["redoneSeconds"] + g["recoverySeconds"] + g["stalledSeconds"])) <= 0.15, g
    assert st["restarts"] == {"preemptions": 1, "failures": 0}
    last = st["lastDisruption"]
    assert last["reason"] == "NodeLost" and last["node"] == node
    restored = st["snapshot"]["restoredStep"]
    assert restored % EVERY == 0 and restored >= EVERY  # a periodic snapshot, not an emergency one
    assert start_step(cluster, namespace, "lost", 1) == restored
    printed = printed_steps(cluster, namespace, "lost", 0)
    assert last["step"] >= max(printed) > restored  # the survivors reported how far the gang got
    assert st["lostWork"]["steps"] == last["step"] - restored > 0
    assert_same_weights(weights, reference_weights)


def test_rank0_preempted_while_a_snapshot_is_written_never_restores_the_partial_one(
        kube, namespace, cluster, start_operator, s3_creds, tmp_path):
    from trainingjob_trainer import contract
    from trainingjob_trainer.store import SnapshotStore

    weights = tmp_path / "weights.pt"
    start_operator(["--resync-seconds", "1"], name="operator-d")
    # A bigger model (about 200 MB of state with Adam) makes every save take a while.
    body = example_job("midsave", namespace, cluster, weights, steps=30, sleep=0.0)
    body["spec"]["args"] += ["--hidden", "2048"]
    kube.create(TJ, body, namespace=namespace)
    wait_phase(kube, namespace, "midsave", "Running", timeout=180)
    root = contract.job_snapshot_root(f"s3://{cluster.bucket}/e2e", namespace, "midsave")
    store = SnapshotStore(root, storage_options=cluster.s3_storage_options())
    partial = None
    deadline = time.monotonic() + 180
    while partial is None and time.monotonic() < deadline:
        partial = next((i for i in store.scan() if not i.complete and i.step >= EVERY and i.listing), None)
        if partial is None:
            time.sleep(0.02)
    assert partial is not None, "never saw a snapshot being written"
    # Node rank 0 hosts the rendezvous. Its node is reclaimed without any grace
    # (every process SIGKILLed at once): no time to finish the save or take an
    # emergency one.
    node = kube.get("pods", "midsave-0-0", namespace=namespace)["spec"]["nodeName"]
    control.lose_node(kube, node)
    try:
        st = wait_status(kube, namespace, "midsave", lambda s: s.get("attempt") == 1 and s.get("gangCreated"),
                         timeout=120, what="attempt 1 created")
    finally:
        control.restore_node(kube, node)
    restored = st["snapshot"].get("restoredFrom")
    # Rank 0 writes the commit marker last; killed mid-save, its folder stays incomplete.
    assert not store.inspect(partial.uri).complete
    assert restored != partial.uri
    if restored is not None:
        assert store.inspect(restored).complete and st["snapshot"]["restoredStep"] < partial.step
    restored_step = st["snapshot"].get("restoredStep") or 0
    st = wait_phase(kube, namespace, "midsave", "Succeeded", timeout=300)
    assert start_step(cluster, namespace, "midsave", 1) == restored_step
    assert st["restarts"] == {"preemptions": 1, "failures": 0}
    assert latest_step(st) == 30


@pytest.mark.timeout(900)
def test_realistic_timing_node_loss_with_real_defaults_is_a_preemption(reference_weights, tmp_path):
    """Issue 9: a node lost on a cluster with Kubernetes' real timing (node-monitor grace
    50 s, taint-based eviction 300 s later), and a job with no recovery overrides: the
    survivors' broken-rendezvous errors must not be counted as a failure."""
    import shutil
    import tempfile

    from localcluster.cluster import LocalCluster
    from trainingjob_operator.model import NODE_MONITOR_GRACE_SECONDS

    state = Path(tempfile.mkdtemp(prefix="lc-real-"))
    lc = LocalCluster(state, node_monitor_grace_seconds=NODE_MONITOR_GRACE_SECONDS, pod_eviction_seconds=300)
    try:
        lc.start()
        kube = lc.client()
        ns = "realistic"
        kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        lc.create_s3_secret(ns)
        lc.start_operator()
        weights = tmp_path / "weights.pt"
        body = example_job("real", ns, lc, weights, sleep=0.3)
        del body["spec"]["recovery"], body["spec"]["terminationGracePeriodSeconds"]  # the defaults, all of them
        kube.create(TJ, body, namespace=ns)
        # Running, then the first snapshot read from S3 itself: with the real defaults the status'
        # snapshot is refreshed once per steady listing (>= 60 s, issue 10), after this job is done.
        wait_status(kube, ns, "real", lambda s: s.get("phase") == "Running", timeout=180, what="Running")
        wait_past_latest_snapshot(lc, ns, "real", attempt=0)
        node = kube.get("pods", "real-0-1", namespace=ns)["spec"]["nodeName"]
        control.lose_node(kube, node)
        phases = []

        def attempt1_running(s: dict) -> bool:
            phases.append(s.get("phase"))
            assert s.get("restarts", {}).get("failures", 0) == 0, s
            return s.get("attempt") == 1 and s.get("phase") == "Running"

        wait_status(kube, ns, "real", attempt1_running, timeout=300, what="attempt 1 running")
        st = wait_phase(kube, ns, "real", "Succeeded", timeout=300)
        control.restore_node(kube, node)
        assert st["restarts"] == {"preemptions": 1, "failures": 0}
        assert st["lastDisruption"]["reason"] == "NodeLost" and st["lastDisruption"]["node"] == node
        # While the lost node was judged (about 110 s), the job stayed Running: never back to
        # Pending (phases are polled, so a short Restarting between two polls may not be in the list).
        assert phases[0] == "Running" and "Pending" not in phases, phases
        assert_same_weights(weights, reference_weights)
    finally:
        lc.stop()
        shutil.rmtree(state, ignore_errors=True)
