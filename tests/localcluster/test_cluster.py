"""LocalCluster orchestration: processes by PID, CRDs, S3, CLI, operator helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localcluster.cluster import CRDS_DIR, LocalCluster
from localcluster.kube import Client, Resource, wait_until
from localcluster.s3 import pid_alive
from trainingjob_trainer import contract

pytestmark = pytest.mark.timeout(120)

STUBBORN_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "stubborn", "namespace": "default"},
    "spec": {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "main",
            "image": "ignored",
            "command": ["python", "-c", textwrap.dedent("""
                import signal, subprocess, time
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                child = subprocess.Popen(["sleep", "300"])
                print("child", child.pid, flush=True)
                while True:
                    time.sleep(0.1)
            """)],
        }],
    },
}


def _running_pids(kube: Client, state_dir: Path) -> list[int]:
    pod = kube.wait_for(
        "pods", "stubborn", "default",
        predicate=lambda p: p is not None and (p.get("status") or {}).get("phase") == "Running", timeout=20,
    )
    assert pod is not None
    main = int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    log = state_dir / "pods" / "default" / "stubborn" / "main.log"
    wait_until(lambda: log.exists() and "child " in log.read_text(), timeout=10, what="the child pid")
    child = int(log.read_text().split("child ")[1].split()[0])
    return [main, child]


def test_cluster_records_pids_serves_crds_and_s3(cluster: LocalCluster, kube: Client) -> None:
    data = json.loads((cluster.state_dir / "cluster.json").read_text())
    assert set(data["processes"]) >= {"apiserver", "s3", "nodeagent"}
    for name, proc in data["processes"].items():
        assert pid_alive(proc["pid"]), name
    assert data["kubeconfig"] == cluster.kubeconfig and Path(cluster.kubeconfig).exists()
    if any(CRDS_DIR.glob("*.yaml")):
        tj = Resource(contract.API_VERSION, contract.PLURAL)
        assert kube.list(tj, "default") == []
    s3 = cluster.s3
    assert s3 is not None and cluster.s3_endpoint and cluster.s3_endpoint.startswith("http://127.0.0.1:")
    client = s3.client()
    client.put_object(Bucket=cluster.bucket, Key="probe/x", Body=b"hello")
    assert client.get_object(Bucket=cluster.bucket, Key="probe/x")["Body"].read() == b"hello"
    assert cluster.s3_env()["AWS_ENDPOINT_URL"] == cluster.s3_endpoint
    status = cluster.status()
    assert status["nodes"] == {n: "True" for n in cluster.nodes}


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    lc = LocalCluster(tmp_path / "lc", nodes=("solo",))
    with lc:
        kube = lc.client()
        kube.create("pods", STUBBORN_POD, "default")
        pids = _running_pids(kube, lc.state_dir)
        infra = [p.pid for p in lc.processes.values()]
        assert all(pid_alive(p) for p in pids + infra)
    wait_until(lambda: not any(pid_alive(p) for p in pids + infra), timeout=10, what="every process to be gone")
    assert json.loads((lc.state_dir / "cluster.json").read_text())["processes"] == {}


def test_cli_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "cli"
    env = {**os.environ}
    env.pop("KUBECONFIG", None)
    up = subprocess.run([sys.executable, "-m", "localcluster", "up", "--state-dir", str(state), "--nodes", "a,b"],
                        capture_output=True, text=True, timeout=90, env=env)
    pids: list[int] = []
    infra: list[int] = []
    try:  # `down` runs whatever fails below, so a failing test leaves no stand-in running
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state.resolve() / 'kubeconfig'}" in up.stdout
        assert "AWS_ENDPOINT_URL=http://127.0.0.1:" in up.stdout
        kube = Client.from_kubeconfig(state / "kubeconfig")
        kube.create("pods", STUBBORN_POD, "default")
        pids = _running_pids(kube, state.resolve())
        st = subprocess.run([sys.executable, "-m", "localcluster", "status", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=30)
        status = json.loads(st.stdout)
        assert status["nodes"] == {"a": "True", "b": "True"}
        assert all(p["alive"] for p in status["processes"].values())
        infra = [p["pid"] for p in status["processes"].values()]
    finally:
        down = subprocess.run([sys.executable, "-m", "localcluster", "down", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    wait_until(lambda: not any(pid_alive(p) for p in pids + infra), timeout=10, what="every process to be gone")


def test_start_operator_runs_with_kubeconfig_and_stops(cluster: LocalCluster) -> None:
    script = "import os, time; print('KUBECONFIG=' + os.environ['KUBECONFIG'], flush=True); time.sleep(300)"
    proc = cluster.start_operator(["--flag"], command=[sys.executable, "-c", script], name="fake-operator")
    log = cluster.state_dir / "fake-operator.log"
    wait_until(lambda: log.exists() and "KUBECONFIG=" in log.read_text(), timeout=10, what="the operator log")
    assert f"KUBECONFIG={cluster.kubeconfig}" in log.read_text()
    assert json.loads((cluster.state_dir / "cluster.json").read_text())["processes"]["fake-operator"]["pid"] == proc.pid
    cluster.stop_operator("fake-operator")
    assert not pid_alive(proc.pid)
    assert "fake-operator" not in json.loads((cluster.state_dir / "cluster.json").read_text())["processes"]


def test_agent_without_nss_wrapper_fails_with_install_hint(tmp_path: Path) -> None:
    env = {**os.environ, "LOCALCLUSTER_NSS_WRAPPER": str(tmp_path / "missing.so")}
    out = subprocess.run(
        [sys.executable, "-m", "localcluster.nodeagent", "--kubeconfig", str(tmp_path / "kc"), "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert out.returncode == 2
    assert "python -m localcluster.tools install" in out.stderr


def test_defect8_lost_node_pods_marked_not_ready_then_evicted_gracefully_and_stay_terminating(tmp_path: Path) -> None:
    import threading

    from localcluster.cluster import lose_node
    from localcluster.kube import condition

    lc = LocalCluster(tmp_path / "ev", nodes=("a", "b"), with_s3=False,
                      node_monitor_grace_seconds=0.5, pod_eviction_seconds=0.5)
    with lc:
        kube = lc.client()
        pod = {**STUBBORN_POD, "spec": {**STUBBORN_POD["spec"], "terminationGracePeriodSeconds": 2,
                                        "nodeSelector": {"kubernetes.io/hostname": "a"}}}
        kube.create("pods", pod, "default")
        pids = _running_pids(kube, lc.state_dir)
        seen: list[dict] = []
        rv = kube.get("pods", "stubborn", "default")["metadata"]["resourceVersion"]

        def watch() -> None:
            for kind, obj in Client(kube.server).watch("pods", "default", resource_version=rv, timeout=20):
                seen.append(obj)
                if kind == "DELETED":
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        lose_node(kube, "a")
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5, what="the lost node's processes to die")
        # The taint manager deletes gracefully; no kubelet finishes it: Terminating while the node is lost.
        p = kube.wait_for("pods", "stubborn", "default",
                          predicate=lambda p: bool(p and p["metadata"].get("deletionTimestamp")), timeout=15)
        assert (condition(p, "DisruptionTarget") or {}).get("reason") == "DeletionByTaintManager"
        assert p["metadata"]["deletionGracePeriodSeconds"] == 2
        not_ready = [o for o in seen if (condition(o, "Ready") or {}).get("status") == "False"
                     and not o["metadata"].get("deletionTimestamp")]
        assert not_ready, "the node lifecycle controller did not mark the pod Ready=False before evicting it"
        node = kube.get("nodes", "a")
        assert (condition(node, "Ready") or {}).get("status") == "Unknown"
        assert {t_["key"] for t_ in node["spec"].get("taints") or []} == {"node.kubernetes.io/unreachable"}
        # Still Terminating after its deadline: proven once the agent finished a pod on the live node
        # that ran past that deadline (the agent has ticked since).
        deadline = p["metadata"]["deletionTimestamp"]
        code = ("import datetime as d, time\n"
                f"end = d.datetime.fromisoformat({deadline!r}.replace('Z', '+00:00')) + d.timedelta(seconds=1)\n"
                "while d.datetime.now(d.timezone.utc) < end: time.sleep(0.1)\n")
        witness = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "witness", "namespace": "default"},
                   "spec": {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": "b"},
                            "containers": [{"name": "main", "image": "ignored", "command": ["python", "-c", code]}]}}
        kube.create("pods", witness, "default")
        kube.wait_for("pods", "witness", "default", timeout=45,
                      predicate=lambda w: (w.get("status") or {}).get("phase") == "Succeeded")
        assert kube.get("pods", "stubborn", "default")["metadata"].get("deletionTimestamp")


def test_defect3_node_config_gives_nodes_capacity_labels_and_taints(tmp_path: Path) -> None:
    from localcluster.kube import condition

    taint = {"key": "dedicated", "value": "training", "effect": "NoSchedule"}
    lc = LocalCluster(tmp_path / "cfg", nodes=("a", "b"), with_s3=False, node_config={
        "*": {"capacity": {"nvidia.com/gpu": "2"}},
        "b": {"capacity": {"nvidia.com/gpu": "4"}, "labels": {"pool": "big"}, "taints": [taint]},
    })
    with lc:
        kube = lc.client()
        a, b = kube.get("nodes", "a"), kube.get("nodes", "b")
        assert a["status"]["allocatable"]["nvidia.com/gpu"] == "2" and b["status"]["capacity"]["nvidia.com/gpu"] == "4"
        assert b["metadata"]["labels"]["pool"] == "big" and b["spec"]["taints"] == [taint]

        def gpu_pod(name: str, gpus: str, **spec: object) -> dict:
            return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                    "spec": {"restartPolicy": "Never", **spec, "containers": [{
                        "name": "main", "image": "ignored", "command": ["python", "-c", "print(1)"],
                        "resources": {"limits": {"nvidia.com/gpu": gpus}}}]}}

        kube.create("pods", gpu_pod("three", "3"), "default")
        p = kube.wait_for("pods", "three", "default", timeout=10,
                          predicate=lambda p: condition(p, "PodScheduled") is not None)
        assert condition(p, "PodScheduled")["message"] == (
            "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, "
            "1 node(s) had untolerated taint {dedicated: training}.")
        kube.create("pods", gpu_pod("tolerant", "3", nodeSelector={"pool": "big"},
                                    tolerations=[{"key": "dedicated", "operator": "Exists"}]), "default")
        p = kube.wait_for("pods", "tolerant", "default", timeout=20,
                          predicate=lambda p: (p.get("status") or {}).get("phase") == "Succeeded")
        assert p["spec"]["nodeName"] == "b"
