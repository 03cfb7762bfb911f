"""Issue 11 item 3, the evidence: two real torchrun jobs side by side, each pod with a network of its own.

On a stand-in with ``network="netns"`` every pod has its own IP and port
space, so two gangs' rank 0 both listen on the rendezvous port 29400 at the
same time (on the host's network the second one cannot). One job is preempted
while both train; both finish, and the preempted one's final weights are bit
for bit those of the job that ran undisturbed next to it (the same job, the
same seed: an uninterrupted run is what the other e2e tests call the
reference).
"""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path
from typing import Iterator

import pytest

from localcluster import control
from localcluster.cluster import LocalCluster
from tests.conftest import running_cluster
from tests.e2e.test_recovery import assert_same_weights, example_job, latest_step, wait_past_latest_snapshot
from tests.integration.helpers import TJ, pods_of, wait_phase, wait_status

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def net_cluster() -> Iterator[LocalCluster]:
    with running_cluster(prefix="lce-", network="netns") as lc:
        yield lc


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
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    net_cluster.create_s3_secret(ns)
    net_cluster.start_operator(["--resync-seconds", "1"])
    weights = {job: tmp_path / f"{job}.pt" for job in ("calm", "hit")}
    for job, path in weights.items():
        kube.create(TJ, example_job(job, ns, net_cluster, path), namespace=ns)
    for job in weights:
        wait_status(kube, ns, job, lambda s: s.get("phase") == "Running", timeout=180, what=f"{job} Running")
    # Both gangs' rank 0 listen on 29400 at once, each on its own pod IP.
    both = lambda: all(_rendezvous_listeners(net_cluster, ns, j) for j in weights)  # noqa: E731
    from localcluster.kube import wait_until

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
