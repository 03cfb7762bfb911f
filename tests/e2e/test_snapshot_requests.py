"""End to end, issue 12: snapshots on request and ahead of a reclaim, on one job.

Real ``kopf run``, real torchrun gangs (2 pods x 2 processes, CPU, gloo), real
S3 writes. The job is asked for a snapshot by annotation (a), then one of its
nodes gets a spot reclaim taint and is lost without SIGTERM (b). Conditions
are read from S3 and the trainers' logs, the status only for its own fields.
"""

from __future__ import annotations

import time

import pytest

from localcluster import control
from tests.e2e.test_recovery import EVERY, assert_same_weights, example_job, printed_steps, start_step
from tests.integration.helpers import TJ, events_of, wait_phase, wait_status
from trainingjob_trainer import contract, s3
from trainingjob_trainer.store import SnapshotStore

pytestmark = [pytest.mark.slow]

SPOT_TAINT = {"key": "aws-node-termination-handler/spot-itn", "value": "true", "effect": "NoSchedule"}


def wait_ack(fs, path: str, value: str, *, timeout: float = 60) -> contract.SnapshotAck:
    """The trainer's acknowledgement of request ``value``, read from S3."""
    deadline = time.monotonic() + timeout
    ack = None
    while time.monotonic() < deadline:
        try:
            ack = contract.SnapshotAck.from_json(fs.cat_file(path))
        except FileNotFoundError:
            ack = None
        if ack is not None and ack.value == value:
            return ack
        time.sleep(0.03)
    raise AssertionError(f"request {value!r} was never acknowledged; last ack: {ack}")


def just_past_periodic_snapshot(cluster, store: SnapshotStore, namespace: str, *, after: int = 0,
                                timeout: float = 180) -> int:
    """Wait until the gang printed 1 or 2 steps past a periodic snapshot newer than
    ``after`` (S3's newest complete one); returns that snapshot's step. A request made
    now is served well before the next periodic snapshot is due."""
    deadline = time.monotonic() + timeout
    while True:
        latest = store.latest_complete()
        printed = max(printed_steps(cluster, namespace, "req", 0), default=0)
        if latest is not None and latest.step > after and latest.step % EVERY == 0 and 0 < printed - latest.step <= 2:
            return latest.step
        assert time.monotonic() < deadline, f"never just past a periodic snapshot: {latest}, printed {printed}"
        time.sleep(0.05)


def test_issue12_on_demand_snapshot_between_periodic_ones_then_reclaim_taint_snapshot_loses_no_work(
        kube, namespace, cluster, start_operator, reference_weights, s3_creds, tmp_path):
    weights = tmp_path / "weights.pt"
    start_operator(["--resync-seconds", "1"], name="operator-req")
    body = example_job("req", namespace, cluster, weights, sleep=0.5)
    body["spec"]["snapshot"]["requestPollSeconds"] = 1
    kube.create(TJ, body, namespace=namespace)
    root = contract.job_snapshot_root(f"s3://{cluster.bucket}/e2e", namespace, "req")
    store = SnapshotStore(root, storage_options=cluster.s3_storage_options())
    fs, ack_path = s3.filesystem(contract.live_object_uri(root, contract.SNAPSHOT_ACK_OBJECT),
                                 cluster.s3_storage_options())

    # (a) Asked right after a periodic snapshot, served before the next one is due.
    periodic = just_past_periodic_snapshot(cluster, store, namespace)
    kube.patch(TJ, "req", {"metadata": {"annotations": {contract.ANNOTATION_SNAPSHOT_REQUEST: "e2e-1"}}},
               namespace=namespace)
    ack = wait_ack(fs, ack_path, "e2e-1")
    assert periodic < ack.step < periodic + EVERY, (periodic, ack)
    assert ack.snapshot == store.uri_for(epoch=0, step=ack.step) and store.inspect(ack.snapshot).complete
    st = wait_status(kube, namespace, "req", lambda s: (s.get("snapshot") or {}).get("lastRequest", {}).get(
        "value") == "e2e-1", timeout=30, what="lastRequest")
    last = st["snapshot"]["lastRequest"]
    assert (last["step"], last["snapshot"], last["completedAt"]) == (ack.step, ack.snapshot, ack.completed_at)
    print(f"[issue12] request e2e-1 decided {st['snapshot']['request']['requestedAt']}, committed "
          f"{ack.completed_at} at step {ack.step} (periodic {periodic})")

    # (b) A reclaim warning on the node of rank 1: a snapshot at once; then the node is
    # lost without SIGTERM while the gang holds at that snapshot's step.
    node = kube.get("pods", "req-0-1", namespace=namespace)["spec"]["nodeName"]
    periodic = just_past_periodic_snapshot(cluster, store, namespace, after=ack.step)
    kube.patch("nodes", node, {"spec": {"taints": [SPOT_TAINT]}})
    try:
        t0 = time.monotonic()
        reclaim = wait_ack(fs, ack_path, f"reclaim-{node}-0")
        print(f"[issue12] taint -> reclaim snapshot committed and seen in S3: {time.monotonic() - t0:.2f}s, "
              f"step {reclaim.step} (periodic {periodic})")
        control.lose_node(kube, node)
        try:
            st = wait_phase(kube, namespace, "req", "Succeeded", timeout=300)
        finally:
            control.restore_node(kube, node)
    finally:
        kube.patch("nodes", node, {"spec": {"taints": None}})
    assert periodic < reclaim.step < periodic + EVERY, (periodic, reclaim)
    assert st["restarts"] == {"preemptions": 1, "failures": 0}
    assert st["lastDisruption"]["reason"] == "NodeLost" and st["lastDisruption"]["node"] == node
    assert st["snapshot"]["restoredFrom"] == reclaim.snapshot and st["snapshot"]["restoredStep"] == reclaim.step
    assert start_step(cluster, namespace, "req", 1) == reclaim.step
    # The reclaim request holds the gang at the snapshot's step (operator default 120 s):
    # no rank steps past it before the kill, so nothing is lost.
    ran_past = max(printed_steps(cluster, namespace, "req", 0)) - reclaim.step
    print(f"[issue12] lost work {st['lostWork']['steps']} step(s), rank 0 ran {ran_past} past the reclaim snapshot")
    assert st["lostWork"]["steps"] == 0 and ran_past == 0, (st["lostWork"], ran_past)
    assert_same_weights(weights, reference_weights)
    warned = [e["message"] for e in events_of(kube, namespace, "req") if e["reason"] == "ReclaimWarning"]
    assert warned and node in warned[0] and SPOT_TAINT["key"] in warned[0], warned
