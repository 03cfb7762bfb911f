"""Defect 11: two operator replicas never both write.

* Leader election on a ``coordination.k8s.io/v1`` Lease (served by the API
  server stand-in): of two replicas one leads and writes; when it is
  SIGKILLed (no release), the other takes the lease after it expires and
  carries on with the job.
* Status writes carry the resourceVersion reconcile read: a write from a
  stale read is refused (409) and nothing of its plan is executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from localcluster.kube import wait_until
from trainingjob_operator.handlers import Controller
from trainingjob_operator.kube import ApiError, Kube
from trainingjob_operator.kubeconfig import Config
from trainingjob_operator.reconcile import Action, Plan

from tests.chart.render import RELEASE, RELEASE_NAMESPACE, VALUES_DIR, render

from .helpers import TJ, job_manifest, pods_of, status, wait_status
from .identity import install_rbac, operator_command, operator_kubeconfig

pytestmark = pytest.mark.integration

LEASE = "coordination.k8s.io/v1"
SA = f"{RELEASE}-trainingjob-operator"
FAST = ["--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5"]


def _holder(kube, namespace: str) -> str | None:
    from localcluster.kube import Resource

    lease = kube.get_or_none(Resource(LEASE, "leases"), SA, namespace=namespace)
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or None


def _entries(log: Path, offset: int) -> list[dict]:
    with log.open("rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def _writes_by(log: Path, offset: int, identity: str) -> list[str]:
    entries = _entries(log, offset)
    return [f"{e['method']} {e['path']}" for e in entries
            if f"({identity})" in e["user_agent"] and e["method"] in ("POST", "PUT", "PATCH", "DELETE")
            and e["resource"] != "leases"]


@pytest.mark.timeout(180)
def test_defect11_one_leader_other_takes_over_when_killed(cluster, kube, namespace, start_operator, tmp_path):
    """Both replicas run as the chart's ServiceAccount with its leader-election RBAC (values: ha)."""
    objs = render(values_files=[VALUES_DIR / "ha.yaml"])
    with install_rbac(kube, objs, RELEASE_NAMESPACE):
        kc = operator_kubeconfig(kube, cluster.api_url, RELEASE_NAMESPACE, SA, tmp_path / "op.kubeconfig")
        _two_replicas(cluster, kube, namespace, start_operator, operator_command(kc))


def _two_replicas(cluster, kube, namespace, start_operator, command) -> None:
    lease_ns = RELEASE_NAMESPACE
    args = ["--leader-elect", "--leader-election-namespace", lease_ns, "--leader-election-name", SA,
            "--resync-seconds", "1", *FAST]
    log = Path(cluster.state_dir) / "api-requests.jsonl"
    offset = log.stat().st_size
    a = start_operator([*args, "--leader-identity", "op-a"], name="leader-a", command=command)
    wait_until(lambda: _holder(kube, lease_ns) == "op-a", timeout=30, what="op-a leads")
    start_operator([*args, "--leader-identity", "op-b"], name="leader-b", command=command)
    kube.create(TJ, job_manifest("ha", namespace, "import time; time.sleep(300)", nodes=2,
                                 recovery={"maxPreemptions": 5}), namespace=namespace)
    wait_status(kube, namespace, "ha", lambda s: s.get("phase") == "Running", timeout=60, what="Running")
    assert _holder(kube, lease_ns) == "op-a"
    assert _writes_by(log, offset, "op-a"), "the leader wrote nothing"
    assert _writes_by(log, offset, "op-b") == [], "the follower wrote"

    os.killpg(a.pid, signal.SIGKILL)  # no clean release: op-b must wait for the lease to expire
    wait_until(lambda: _holder(kube, lease_ns) == "op-b", timeout=30, what="op-b takes the lease")
    # op-b now reconciles: a pod deleted by someone else is a preemption, attempt 1 runs.
    kube.delete("pods", "ha-0-1", namespace=namespace, grace_period=0)
    st = wait_status(kube, namespace, "ha", lambda s: s.get("attempt") == 1 and s.get("phase") == "Running",
                     timeout=60, what="attempt 1 running under op-b")
    assert st["restarts"]["preemptions"] == 1
    assert _writes_by(log, offset, "op-b"), "the new leader wrote nothing"
    refused = [e for e in _entries(log, offset) if e["status"] in (401, 403)]
    assert not refused, refused
    kube.delete(TJ, "ha", namespace=namespace)
    cluster.stop_operator("leader-b")  # releases the Lease on the way out
    wait_until(lambda: _holder(kube, lease_ns) is None, timeout=15, what="the Lease released")


@pytest.mark.timeout(60)
def test_defect11_stale_status_write_is_refused(cluster, kube, namespace):
    kube.create(TJ, job_manifest("stale", namespace, "print(1)", nodes=1), namespace=namespace)
    stale = kube.get(TJ, "stale", namespace=namespace)
    # Another writer (a second replica, a user) changes the status after our read.
    kube.patch(TJ, "stale", {"status": {"phase": "Running", "attempt": 0}}, namespace=namespace,
               subresource="status")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stale-side-effect", "namespace": namespace},
           "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"]}]}}
    plan = Plan(status={"phase": "Pending", "attempt": 7}, actions=[Action("create", "Pod", "stale-side-effect", pod)])

    async def run() -> None:
        ctl = Controller()
        ctl.kube = Kube(Config(server=cluster.api_url))
        try:
            await ctl.execute(stale, plan, dt_now())
        finally:
            await ctl.kube.close()

    with pytest.raises(ApiError) as err:
        asyncio.run(run())
    assert err.value.status == 409
    assert status(kube, namespace, "stale") == {"phase": "Running", "attempt": 0}
    assert not pods_of(kube, namespace, "stale") and kube.get_or_none("pods", "stale-side-effect", namespace) is None


def dt_now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)
