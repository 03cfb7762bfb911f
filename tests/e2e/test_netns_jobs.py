"""Issue 11 items 3 and 4, the evidence: real torchrun gangs, each pod with a network of its own.

On a stand-in with ``network="netns"`` every pod has its own IP and port
space, so two gangs' rank 0 both listen on the rendezvous port 29400 at the
same time (on the host's network the second one cannot).

* Two jobs side by side: one is preempted while both train; both finish, and
  the preempted one's final weights are bit for bit those of the job that ran
  undisturbed next to it (the same job, the same seed: an uninterrupted run is
  what the other e2e tests call the reference).
* A partition: a node's link to the API server is cut (iptables in its pods'
  namespaces) while its torchrun gang trains; the old gang keeps training and
  saving to S3 while attempt 1 runs on another node, and the fence keeps its
  late commits and prunes out.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from localcluster import control
from localcluster.cluster import LocalCluster
from localcluster.kube import wait_until
from tests.conftest import running_cluster
from tests.e2e.test_recovery import (
    EVERY, assert_same_weights, example_job, latest_step, pod_logs, printed_steps, wait_past_latest_snapshot,
)
from tests.integration.helpers import TJ, pods_of, wait_phase, wait_status

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def net_cluster() -> Iterator[LocalCluster]:
    with running_cluster(prefix="lce-", network="netns") as lc:
        lc.start_operator(["--resync-seconds", "1"])  # one operator for the module's jobs
        yield lc


def _namespace(lc: LocalCluster, ns: str) -> None:
    lc.client().create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    lc.create_s3_secret(ns)


def _rendezvous_listeners(lc: LocalCluster, namespace: str, job: str) -> bool:
    """Whether the rank-0 pod of ``job`` listens on the rendezvous port in its own namespace."""
    import subprocess

    from trainingjob_trainer import contract

    pod = next((p for p in pods_of(lc.client(), namespace, job) if p["metadata"]["name"].endswith("-0")), None)
    ip = ((pod or {}).get("status") or {}).get("podIP")
    net = next((n for n in lc.network_namespaces().pods() if n.ip == ip), None)
    if net is None:
        return False
    out = subprocess.run([*net.exec_prefix(), "ss", "-Hltn", f"sport = :{contract.RDZV_PORT}"],
                         capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_issue11_two_jobs_side_by_side_one_preempted_both_bit_identical(net_cluster: LocalCluster, tmp_path: Path) -> None:
    kube = net_cluster.client()
    ns = "side-by-side"
    _namespace(net_cluster, ns)
    weights = {job: tmp_path / f"{job}.pt" for job in ("calm", "hit")}
    for job, path in weights.items():
        kube.create(TJ, example_job(job, ns, net_cluster, path), namespace=ns)
    for job in weights:
        wait_status(kube, ns, job, lambda s: s.get("phase") == "Running", timeout=180, what=f"{job} Running")
    # Both gangs' rank 0 listen on 29400 at once, each on its own pod IP.
    both = lambda: all(_rendezvous_listeners(net_cluster, ns, j) for j in weights)  # noqa: E731
    wait_until(both, timeout=60, what="both rendezvous listening on port 29400")
    ips = {p["status"]["podIP"] for j in weights for p in pods_of(kube, ns, j)}
    assert len(ips) == 4 and all(ipaddress.ip_address(ip).is_private and not ipaddress.ip_address(ip).is_loopback
                                 for ip in ips), ips

    wait_past_latest_snapshot(net_cluster, ns, "hit", attempt=0, timeout=180)
    control.preempt(kube, ns, "hit-0-1", reason="PreemptionByScheduler", message="e2e: two jobs, one preempted")

    done: dict[str, dict] = {}

    def finish(job: str) -> None:
        done[job] = wait_phase(kube, ns, job, "Succeeded", timeout=300)

    threads = [threading.Thread(target=finish, args=(j,)) for j in weights]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(done) == set(weights), f"not both Succeeded: {sorted(done)}"
    assert done["calm"]["restarts"] == {"preemptions": 0, "failures": 0}
    assert done["hit"]["restarts"] == {"preemptions": 1, "failures": 0}
    assert done["hit"]["lostWork"]["steps"] == 0
    assert latest_step(done["hit"]) == latest_step(done["calm"]) > 0
    assert_same_weights(weights["hit"], weights["calm"])


def test_issue11_item4_partitioned_node_old_torchrun_gang_saves_on_but_never_corrupts_snapshots(
        net_cluster: LocalCluster, tmp_path: Path) -> None:
    """A node is cut from the API server while its gang runs (torchrun, 2 ranks): its
    processes keep training and saving (they still reach S3) while the operator
    declares the node lost and starts attempt 1 on another node, whose rank 0
    listens on port 29400 beside the old one's. The fence in S3 makes the old
    gang's commits, prunes and folder clearing refused; nothing it commits after
    the fence is restored; attempt 1's snapshots stay intact; the weights are
    those of the same gang run without a disruption."""
    from trainingjob_trainer import contract
    from trainingjob_trainer.store import SnapshotStore

    kube = net_cluster.client()
    ns = "partition"
    _namespace(net_cluster, ns)
    steps, sleep = 60, 0.3
    reference = tmp_path / "reference.pt"  # the same 2-rank training, uninterrupted, without snapshots
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TJ_", "PET_"))}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "trainingjob_trainer.example", "--steps", str(steps), "--final-weights", str(reference)],
                   env=env, check=True, timeout=180, capture_output=True)
    weights = tmp_path / "weights.pt"
    job = example_job("part", ns, net_cluster, weights, steps=steps, sleep=sleep, nodes=1, procsPerNode=2)
    job["spec"]["snapshot"]["keepLast"] = 1  # the old gang's prune would delete attempt 1's snapshots
    kube.create(TJ, job, namespace=ns)
    wait_status(kube, ns, "part", lambda s: s.get("phase") == "Running" and latest_step(s) >= EVERY,
                timeout=180, what="first snapshot")
    old = kube.get("pods", "part-0-0", namespace=ns)
    node, old_ip = old["spec"]["nodeName"], old["status"]["podIP"]
    control.partition_node(kube, node)  # netns mode: a real cut of the node's pods' link to the API server
    try:
        st = wait_status(kube, ns, "part", lambda s: s.get("attempt", 0) >= 1 and s.get("phase") == "Running",
                         timeout=120, what="attempt 1 running")
        new = kube.get("pods", "part-1-0", namespace=ns)
        assert new["spec"]["nodeName"] != node and new["status"]["podIP"] != old_ip
        # The old gang trains on past two more snapshot steps after attempt 1 started.
        past = min(steps, st["snapshot"]["restoredStep"] + 2 * EVERY + 1)
        try:
            wait_until(lambda: max(printed_steps(net_cluster, ns, "part", 0), default=0) >= past, timeout=90,
                       interval=0.2, what=f"the old gang past step {past}")
        except TimeoutError as e:
            pytest.fail(f"{e}; it stopped before:\n" + pod_logs(net_cluster, ns, "part", 0)[-3000:])
    finally:
        control.heal_node(kube, node)  # the agent then stops the old processes, as a reconnecting kubelet does
    st = wait_phase(kube, ns, "part", "Succeeded", timeout=240)
    assert st["attempt"] == 1 and st["lastDisruption"]["reason"] == "NodeLost"

    store = SnapshotStore(contract.job_snapshot_root(f"s3://{net_cluster.bucket}/e2e", ns, "part"),
                          storage_options=net_cluster.s3_storage_options())
    fence = store.read_fence()
    assert fence is not None and fence.attempt == 1
    old_log = pod_logs(net_cluster, ns, "part", 0)
    assert "fenced: not" in old_log, old_log[-3000:]  # its saves after the fence were refused ...
    assert "pruned" not in old_log.split("fenced: not", 1)[1]  # ... and it pruned nothing since
    # Nothing the old gang committed after the fence is restorable, and attempt 1 restored an admitted one.
    assert st["snapshot"]["restoredFrom"].rsplit("/", 1)[-1] in fence.admitted
    for info in store.scan():
        if info.marker is not None and info.marker.attempt == 0 and info.complete:
            assert fence.admitted.get(info.name) == info.marker.save_id, info.name
    # Attempt 1's snapshots are intact: its last one is the latest, complete.
    latest = store.latest_complete()
    assert latest is not None and latest.marker.attempt == 1 and latest.step == steps
    assert_same_weights(weights, reference)
