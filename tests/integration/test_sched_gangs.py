"""Gangs that cannot be fully scheduled (issue 9, defect 3), on a stand-in whose
scheduler counts GPUs: two 3-node jobs compete for 4 nodes of one GPU each."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from localcluster.cluster import LocalCluster

from .helpers import TJ, events_of, job_manifest, pods_of, status, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

NODES = ("gpu-0", "gpu-1", "gpu-2", "gpu-3")


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[LocalCluster]:
    state_dir = Path(tempfile.mkdtemp(prefix="lc-gpu-"))
    lc = LocalCluster(state_dir, nodes=NODES, with_s3=False,
                      node_config={"*": {"capacity": {"nvidia.com/gpu": "1"}}})
    lc.start()
    try:
        yield lc
    finally:
        lc.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


RENDEZVOUS = """
import os, pathlib, sys, time
d = pathlib.Path({dir!r}) / (os.environ["TJ_JOB_NAME"] + "-" + os.environ["TJ_ATTEMPT"])
d.mkdir(parents=True, exist_ok=True)
(d / os.environ["TJ_NODE_RANK"]).touch()
deadline = time.time() + 15
while len(list(d.iterdir())) < 3:
    if time.time() > deadline:
        sys.exit("rendezvous timed out: not all ranks joined")
    time.sleep(0.2)
time.sleep(20)
"""


def test_defect3_two_gangs_competing_for_gpus_neither_deadlocks_nor_counts_failures(
        gpu_cluster: LocalCluster, tmp_path: Path) -> None:
    kube = gpu_cluster.client()
    ns = "sched"
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    op = gpu_cluster.start_operator(["--resync-seconds", "1"])
    try:
        spec = {"resources": {"limits": {"nvidia.com/gpu": "1"}}, "terminationGracePeriodSeconds": 2,
                "recovery": {"schedulingTimeoutSeconds": 10, "backoffSeconds": 2, "maxFailures": 0}}
        # Like torchrun: each rank waits for all 3 at a rendezvous (a folder here) and gives up
        # after 15 s; a full gang then holds its GPUs for 20 s, longer than that timeout.
        for name in ("a", "b"):
            kube.create(TJ, job_manifest(name, ns, RENDEZVOUS.format(dir=str(tmp_path)), nodes=3, **spec),
                        namespace=ns)
        seen_unschedulable: dict[str, str] = {}

        def both_done(_: dict) -> bool:
            for name in ("a", "b"):
                st = status(kube, ns, name)
                if st.get("reason") == "Unschedulable":
                    seen_unschedulable.setdefault(name, st.get("message", ""))
                assert st.get("restarts", {}).get("failures", 0) == 0, st
                assert st.get("phase") != "Failed", st
                running = [p for p in pods_of(kube, ns, name) if (p.get("status") or {}).get("phase") == "Running"]
                assert len(running) <= 3
            return all(status(kube, ns, n).get("phase") == "Succeeded" for n in ("a", "b"))

        wait_status(kube, ns, "a", both_done, timeout=200, what="both gangs to succeed")
        assert seen_unschedulable, "no gang ever reported Unschedulable"
        for msg in seen_unschedulable.values():
            assert "0/4 nodes are available" in msg and "Insufficient nvidia.com/gpu" in msg
            assert "schedulingTimeoutSeconds=10" in msg
        finals = {n: status(kube, ns, n) for n in ("a", "b")}
        assert all(st["restarts"]["failures"] == 0 and st["restarts"]["preemptions"] == 0 for st in finals.values())
        retried = [n for n, st in finals.items() if st["restarts"].get("transient", 0) >= 1]
        assert retried, finals  # the gang that could not run was torn down and retried, uncounted
        for n in retried:
            assert finals[n]["lastDisruption"]["reason"] == "Unschedulable"
            assert any(e["reason"] == "Unschedulable" for e in events_of(kube, ns, n))
    finally:
        gpu_cluster.stop_operator()
        if op.alive:
            op.stop()
