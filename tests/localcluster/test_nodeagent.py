"""The node agent plays kubelet: pod lifecycle, env, deletion, disruptions, DNS."""

from __future__ import annotations

import base64
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from localcluster.cluster import LocalCluster, evict, lose_node, preempt, restore_node
from localcluster.kube import Client, condition, wait_until
from trainingjob_trainer import contract

pytestmark = pytest.mark.timeout(120)


def pod_manifest(name: str, script: str, *, env: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": contract.CONTAINER_NAME,
        "image": "ignored:latest",
        "command": ["python", "-c", textwrap.dedent(script)],
        "env": [
            {"name": contract.ENV_TERMINATION_MESSAGE_PATH, "value": contract.DEFAULT_TERMINATION_MESSAGE_PATH},
            *(env or []),
        ],
        "terminationMessagePath": contract.DEFAULT_TERMINATION_MESSAGE_PATH,
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "t", "rank": "0"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container], **spec},
    }


def phase(pod: dict[str, Any] | None) -> str | None:
    return None if pod is None else (pod.get("status") or {}).get("phase")


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def wait_phase(kube: Client, ns: str, name: str, *phases: str, timeout: float = 20) -> dict[str, Any]:
    pod = kube.wait_for("pods", name, ns, predicate=lambda p: phase(p) in phases, timeout=timeout)
    assert pod is not None
    return pod


class Recorder:
    """Watches one pod in the background and keeps every version seen."""

    def __init__(self, kube: Client, ns: str, name: str) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.deleted = threading.Event()
        self._ready = threading.Event()
        self._kube, self._ns, self._name = kube, ns, name
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # noqa: BLE001 - the cluster went away; the test asserts on what was seen
            pass

    def _watch(self) -> None:
        client = Client(self._kube.server)
        deadline = time.monotonic() + 60
        self._ready.set()
        rv = None
        while time.monotonic() < deadline and not self.deleted.is_set():
            for kind, obj in client.watch(
                "pods", self._ns, field_selector=f"metadata.name={self._name}", resource_version=rv, timeout=5
            ):
                rv = obj.get("metadata", {}).get("resourceVersion") or rv
                self.seen.append((kind, obj))
                if kind == "DELETED":
                    self.deleted.set()
                    return

    def phases(self) -> list[str]:
        out: list[str] = []
        for _, obj in self.seen:
            ph = phase(obj)
            if ph and (not out or out[-1] != ph):
                out.append(ph)
        return out

    def last_with_terminated(self) -> dict[str, Any]:
        for _, obj in reversed(self.seen):
            for cs in (obj.get("status") or {}).get("containerStatuses") or []:
                if "terminated" in (cs.get("state") or {}):
                    return obj
        raise AssertionError(f"no terminated state seen in {[k for k, _ in self.seen]}")


def pod_log(cluster: LocalCluster, ns: str, name: str) -> str:
    return (cluster.state_dir / "pods" / ns / name / f"{contract.CONTAINER_NAME}.log").read_text()


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------
def test_pod_runs_to_success_with_termination_message(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    rec = Recorder(kube, namespace, "ok")
    kube.create("pods", pod_manifest("ok", f"""
        import os, sys, time
        time.sleep(1.0)
        path = os.environ["{contract.ENV_TERMINATION_MESSAGE_PATH}"]
        print("path", path, "cwd", os.getcwd(), "python", sys.executable, flush=True)
        open(path, "w").write('{{"reason": "Completed", "step": 7}}')
    """), namespace)
    pod = wait_phase(kube, namespace, "ok", "Succeeded", "Failed")
    assert phase(pod) == "Succeeded", pod["status"]
    t = terminated(pod)
    assert t["exitCode"] == 0 and t["reason"] == "Completed"
    msg = contract.parse_termination_message(t["message"])
    assert msg is not None and msg.reason == "Completed" and msg.step == 7
    assert t["startedAt"] and t["finishedAt"]
    assert pod["spec"]["nodeName"] in cluster.nodes
    assert (condition(pod, "PodScheduled") or {}).get("status") == "True"
    assert pod["status"]["podIP"] == "127.0.0.1"
    wait_until(lambda: "Succeeded" in rec.phases(), timeout=5)
    assert rec.phases()[-3:] == ["Pending", "Running", "Succeeded"], rec.phases()
    running = next(o for _, o in rec.seen if phase(o) == "Running")
    cs = running["status"]["containerStatuses"][0]
    assert cs["ready"] is True and "startedAt" in cs["state"]["running"]
    assert (condition(running, "Ready") or {}).get("status") == "True"
    # The agent overrides the termination-message env var with a private file;
    # the venv's python is first on PATH.
    log = pod_log(cluster, namespace, "ok")
    assert contract.DEFAULT_TERMINATION_MESSAGE_PATH not in log
    assert str(cluster.state_dir / "pods" / namespace / "ok") in log
    assert os.path.dirname(os.path.abspath(os.sys.executable)) in log


def test_nonzero_exit_fails_with_exit_code_and_log_fallback(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    kube.create("pods", pod_manifest("bad", """
        import sys
        for i in range(200):
            print("line", i)
        print("boom: the last words", flush=True)
        sys.exit(3)
    """, container={"terminationMessagePolicy": "FallbackToLogsOnError"}), namespace)
    pod = wait_phase(kube, namespace, "bad", "Succeeded", "Failed")
    assert phase(pod) == "Failed"
    t = terminated(pod)
    assert t["exitCode"] == 3 and t["reason"] == "Error"
    assert t["message"].rstrip().endswith("boom: the last words")
    assert "line 0\n" not in t["message"]  # only the tail
    assert len(t["message"].encode()) <= 2048 and len(t["message"].splitlines()) <= 80


def test_env_from_secret_configmap_and_fields(kube: Client, namespace: str) -> None:
    env = [
        {"name": "ACCESS", "valueFrom": {"secretKeyRef": {"name": "creds", "key": contract.SECRET_KEY_ACCESS_KEY_ID}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "missing", "optional": True}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['rank']"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "GREETING", "value": "hello-$(POD)"},
    ]
    script = f"""
        import json, os
        keys = ["ACCESS", "TOKEN", "POD", "NS", "NODE", "RANK", "IP", "GREETING", "FROM_CM"]
        open(os.environ["{contract.ENV_TERMINATION_MESSAGE_PATH}"], "w").write(json.dumps({{k: os.environ.get(k) for k in keys}}))
    """
    manifest = pod_manifest("envy", script, env=env, container={"envFrom": [{"configMapRef": {"name": "cm"}}]})
    kube.create("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"FROM_CM": "cm-value"}}, namespace)
    kube.create("pods", manifest, namespace)
    # The Secret does not exist yet: the pod waits with CreateContainerConfigError.
    def config_error() -> Any:
        pod = kube.get("pods", "envy", namespace)
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            return (cs["state"].get("waiting") or {}).get("reason") == "CreateContainerConfigError" and pod
    pod = wait_until(config_error, timeout=10)
    assert phase(pod) == "Pending"
    assert "creds" in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    secret_value = "AKIA-test-value"
    kube.create("secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "data": {contract.SECRET_KEY_ACCESS_KEY_ID: base64.b64encode(secret_value.encode()).decode()},
    }, namespace)
    pod = wait_phase(kube, namespace, "envy", "Succeeded", "Failed")
    got = json.loads(terminated(pod)["message"])
    assert got == {
        "ACCESS": secret_value, "TOKEN": None, "POD": "envy", "NS": namespace, "NODE": pod["spec"]["nodeName"],
        "RANK": "0", "IP": "127.0.0.1", "GREETING": "hello-envy", "FROM_CM": "cm-value",
    }


SIGTERM_SCRIPT = f"""
    import os, signal, sys, time
    def on_term(signum, frame):
        open(os.environ["{contract.ENV_TERMINATION_MESSAGE_PATH}"], "w").write("got SIGTERM")
        sys.exit({contract.EXIT_PREEMPTED_AFTER_SNAPSHOT})
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
"""


def wait_log(cluster: LocalCluster, ns: str, name: str, text: str, timeout: float = 15) -> None:
    def has() -> bool:
        try:
            return text in pod_log(cluster, ns, name)
        except OSError:
            return False
    wait_until(has, timeout=timeout, what=f"{text!r} in the log of {name}")


def test_graceful_delete_delivers_sigterm(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    kube.create("pods", pod_manifest("graceful", SIGTERM_SCRIPT), namespace)
    wait_phase(kube, namespace, "graceful", "Running")
    wait_log(cluster, namespace, "graceful", "ready")
    rec = Recorder(kube, namespace, "graceful")
    kube.delete("pods", "graceful", namespace)
    assert rec.deleted.wait(15), rec.phases()
    final = rec.last_with_terminated()
    t = terminated(final)
    assert t["exitCode"] == contract.EXIT_PREEMPTED_AFTER_SNAPSHOT
    assert t["message"] == "got SIGTERM"
    assert kube.get_or_none("pods", "graceful", namespace) is None


def test_sigterm_ignored_is_sigkilled_after_grace(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    script = """
        import os, signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "300"])
        print("child", child.pid, flush=True)
        while True:
            time.sleep(0.05)
    """
    kube.create("pods", pod_manifest("stubborn", script, terminationGracePeriodSeconds=1), namespace)
    wait_phase(kube, namespace, "stubborn", "Running")
    wait_log(cluster, namespace, "stubborn", "child ")
    child = int(pod_log(cluster, namespace, "stubborn").split("child ")[1].split()[0])
    rec = Recorder(kube, namespace, "stubborn")
    start = time.monotonic()
    kube.delete("pods", "stubborn", namespace)
    assert rec.deleted.wait(15)
    took = time.monotonic() - start
    t = terminated(rec.last_with_terminated())
    assert t["exitCode"] == 128 + signal.SIGKILL and t.get("signal") == signal.SIGKILL
    assert 0.9 <= took < 8, took
    wait_until(lambda: pid_gone(child), timeout=5, what="the container's child process to die")


def test_preempt_sets_disruption_target_and_sigterms(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    kube.create("pods", pod_manifest("victim", SIGTERM_SCRIPT), namespace)
    wait_phase(kube, namespace, "victim", "Running")
    wait_log(cluster, namespace, "victim", "ready")
    rec = Recorder(kube, namespace, "victim")
    preempt(kube, namespace, "victim", message="make room")
    assert rec.deleted.wait(15)
    final = rec.last_with_terminated()
    dt = condition(final, "DisruptionTarget")
    assert dt is not None and dt["status"] == "True" and dt["reason"] == "PreemptionByScheduler"
    assert dt["message"] == "make room"
    t = terminated(final)
    assert t["message"] == "got SIGTERM" and t["exitCode"] == contract.EXIT_PREEMPTED_AFTER_SNAPSHOT
    assert any(o["metadata"].get("deletionTimestamp") for _, o in rec.seen)


def test_evict_disrupts_the_pod(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    kube.create("pods", pod_manifest("evictee", SIGTERM_SCRIPT), namespace)
    wait_phase(kube, namespace, "evictee", "Running")
    wait_log(cluster, namespace, "evictee", "ready")
    rec = Recorder(kube, namespace, "evictee")
    evict(kube, namespace, "evictee")
    assert rec.deleted.wait(15)
    final = rec.last_with_terminated()
    assert (condition(final, "DisruptionTarget") or {}).get("status") == "True"
    assert terminated(final)["message"] == "got SIGTERM"


def test_lose_node_kills_processes_and_node_goes_not_ready(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    node = cluster.nodes[-1]
    script = """
        import subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        print("child", child.pid, flush=True)
        while True:
            time.sleep(0.05)
    """
    kube.create("pods", pod_manifest("onlost", script, nodeSelector={"kubernetes.io/hostname": node}), namespace)
    pod = wait_phase(kube, namespace, "onlost", "Running")
    assert pod["spec"]["nodeName"] == node
    wait_log(cluster, namespace, "onlost", "child ")
    child = int(pod_log(cluster, namespace, "onlost").split("child ")[1].split()[0])
    main = int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    try:
        lose_node(kube, node)
        wait_until(lambda: pid_gone(main) and pid_gone(child), timeout=5, what="the node's processes to die")
        n = kube.wait_for("nodes", node, predicate=lambda n: (condition(n, "Ready") or {}).get("status") == "Unknown", timeout=10)
        assert (condition(n, "Ready") or {}).get("reason") == "NodeStatusUnknown"
        # The pod stays as the dead kubelet left it.
        assert phase(kube.get("pods", "onlost", namespace)) == "Running"
        # Nothing new is scheduled onto the lost node.
        kube.create("pods", pod_manifest("after", "print(1)"), namespace)
        assert wait_phase(kube, namespace, "after", "Succeeded")["spec"]["nodeName"] != node
    finally:
        restore_node(kube, node)
    kube.wait_for("nodes", node, predicate=lambda n: (condition(n, "Ready") or {}).get("status") == "True", timeout=15)
    # Back from the dead, the kubelet reports the pod it lost.
    pod = wait_phase(kube, namespace, "onlost", "Failed")
    assert terminated(pod)["reason"] == "ContainerStatusUnknown"


def test_pod_dns_name_resolves_in_pod(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    kube.create("services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang"},
        "spec": {"clusterIP": "None", "selector": {"app": "t"}, "ports": [{"name": "c10d", "port": contract.RDZV_PORT}]},
    }, namespace)
    fqdn = f"rank0.gang.{namespace}.svc.cluster.local"
    script = f"""
        import datetime, json, os, socket
        from torch.distributed import TCPStore
        out = {{}}
        for name in ["{fqdn}", "rank0.gang.{namespace}.svc", "rank0.gang", "gang.{namespace}.svc.cluster.local", "localhost"]:
            out[name] = socket.gethostbyname(name)
        out["hostname"] = socket.gethostname()
        server = TCPStore("localhost", 0, 1, True, timeout=datetime.timedelta(seconds=10))
        client = TCPStore("{fqdn}", server.port, 1, False, timeout=datetime.timedelta(seconds=10))
        client.set("k", "v")
        out["store"] = server.get("k").decode()
        open(os.environ["{contract.ENV_TERMINATION_MESSAGE_PATH}"], "w").write(json.dumps(out))
    """
    kube.create("pods", pod_manifest("rank0", script, hostname="rank0", subdomain="gang"), namespace)
    pod = wait_phase(kube, namespace, "rank0", "Succeeded", "Failed", timeout=60)
    assert phase(pod) == "Succeeded", pod_log(cluster, namespace, "rank0")
    got = json.loads(terminated(pod)["message"])
    assert got.pop("store") == "v"
    assert got.pop("hostname") == "rank0"
    assert set(got.values()) == {"127.0.0.1"}, got


def test_malformed_pods_do_not_break_the_agent(cluster: LocalCluster, kube: Client, namespace: str) -> None:
    no_cmd = pod_manifest("nocmd", "")
    del no_cmd["spec"]["containers"][0]["command"]
    kube.create("pods", no_cmd, namespace)
    missing = pod_manifest("noexec", "")
    missing["spec"]["containers"][0]["command"] = ["/nonexistent/binary"]
    kube.create("pods", missing, namespace)
    badref = pod_manifest("badref", "", env=[{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}])
    kube.create("pods", badref, namespace)

    def waiting_reason(name: str) -> Callable[[], Any]:
        def f() -> Any:
            for cs in (kube.get("pods", name, namespace).get("status") or {}).get("containerStatuses") or []:
                return (cs["state"].get("waiting") or {}).get("reason")
        return f

    assert wait_until(waiting_reason("nocmd"), timeout=10) == "CreateContainerError"
    assert wait_until(waiting_reason("badref"), timeout=10) == "CreateContainerConfigError"
    pod = wait_phase(kube, namespace, "noexec", "Failed")
    t = terminated(pod)
    assert t["exitCode"] == 128 and t["reason"] == "StartError" and "/nonexistent/binary" in t["message"]
    # The agent is still alive and serving.
    kube.create("pods", pod_manifest("fine", "print('fine')"), namespace)
    assert phase(wait_phase(kube, namespace, "fine", "Succeeded", "Failed")) == "Succeeded"
    assert cluster.processes["nodeagent"].alive
    for name in ("nocmd", "badref"):
        kube.delete("pods", name, namespace)
        kube.wait_for("pods", name, namespace, predicate=lambda p: p is None, timeout=10)


def test_scheduler_spreads_and_honours_node_selector(kube: Client, namespace: str, cluster: LocalCluster) -> None:
    names = [f"spread-{i}" for i in range(len(cluster.nodes))]
    for n in names:
        kube.create("pods", pod_manifest(n, "import time; time.sleep(3)"), namespace)
    nodes = {wait_phase(kube, namespace, n, "Running", "Succeeded")["spec"]["nodeName"] for n in names}
    assert nodes == set(cluster.nodes)
    kube.create("pods", pod_manifest("pinned", "print(1)", nodeSelector={"kubernetes.io/hostname": cluster.nodes[1]}), namespace)
    kube.create("pods", pod_manifest("nowhere", "print(1)", nodeSelector={"kubernetes.io/hostname": "no-such-node"}), namespace)
    assert wait_phase(kube, namespace, "pinned", "Succeeded")["spec"]["nodeName"] == cluster.nodes[1]
    sched = kube.wait_for("pods", "nowhere", namespace, predicate=lambda p: condition(p, "PodScheduled") is not None, timeout=10)
    assert condition(sched, "PodScheduled")["reason"] == "Unschedulable"
    assert not sched["spec"].get("nodeName")
    kube.delete("pods", "nowhere", namespace)
    for n in names:
        wait_phase(kube, namespace, n, "Succeeded")


@pytest.mark.slow
def test_torchrun_gang_rendezvous_through_pod_dns(cluster: LocalCluster, kube: Client, namespace: str, tmp_path: Path) -> None:
    """Two pods, one torchrun each, c10d rendezvous at rank 0's DNS name, gloo all_reduce."""
    from localcluster.s3 import free_port

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        open(os.environ["TJ_TERMINATION_MESSAGE_PATH"], "w").write(f"{dist.get_rank()}/{dist.get_world_size()}:{t.item()}")
        dist.destroy_process_group()
    """))
    kube.create("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang"},
                             "spec": {"clusterIP": "None", "selector": {"job": "tr"}}}, namespace)
    endpoint = f"tr-0.gang.{namespace}.svc.cluster.local:{free_port()}"
    for rank in range(2):
        kube.create("pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"tr-{rank}", "labels": {"job": "tr"}},
            "spec": {
                "hostname": f"tr-{rank}", "subdomain": "gang", "restartPolicy": "Never",
                "containers": [{
                    "name": contract.CONTAINER_NAME, "image": "ignored",
                    "command": ["torchrun", str(script)],
                    "env": [
                        {"name": contract.PET_NNODES, "value": "2"},
                        {"name": contract.PET_NPROC_PER_NODE, "value": "1"},
                        {"name": contract.PET_RDZV_BACKEND, "value": contract.RDZV_BACKEND},
                        {"name": contract.PET_RDZV_ENDPOINT, "value": endpoint},
                        {"name": contract.PET_RDZV_ID, "value": namespace},
                    ],
                }],
            },
        }, namespace)
    pods = [wait_phase(kube, namespace, f"tr-{r}", "Succeeded", "Failed", timeout=90) for r in range(2)]
    for pod in pods:
        assert phase(pod) == "Succeeded", pod_log(cluster, namespace, pod["metadata"]["name"])[-3000:]
    # The ranks are assigned by the rendezvous; the message is written by worker rank 0 of each pod.
    assert sorted(terminated(p)["message"] for p in pods) == ["0/2:3.0", "1/2:3.0"]


def _waiting(pod: dict[str, Any] | None) -> dict[str, Any]:
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        return (cs.get("state") or {}).get("waiting") or {}
    return {}


def test_defect4_unpullable_and_invalid_images_report_the_kubelets_waiting_reasons(kube: Client, namespace: str) -> None:
    from localcluster.imageref import UNPULLABLE_REGISTRY
    missing = pod_manifest("missing-image", "print(1)", container={"image": f"{UNPULLABLE_REGISTRY}team/trainer:9"})
    bad = pod_manifest("bad-image", "print(1)", container={"image": "Team/Trainer:latest"})
    seen: list[str] = []
    kube.create("pods", missing, namespace)
    kube.create("pods", bad, namespace)

    def pulled_then_backoff(p: dict[str, Any] | None) -> bool:
        reason = _waiting(p).get("reason")
        if reason and (not seen or seen[-1] != reason):
            seen.append(reason)
        return reason == "ImagePullBackOff"

    p = kube.wait_for("pods", "missing-image", namespace, predicate=pulled_then_backoff, timeout=20, interval=0.05)
    assert seen[0] == "ErrImagePull" and seen[-1] == "ImagePullBackOff"
    assert phase(p) == "Pending" and f'"{UNPULLABLE_REGISTRY}team/trainer:9"' in _waiting(p)["message"]
    b = kube.wait_for("pods", "bad-image", namespace, predicate=lambda p: bool(_waiting(p)), timeout=20)
    assert _waiting(b)["reason"] == "InvalidImageName" and "invalid reference format" in _waiting(b)["message"]
    assert phase(b) == "Pending"


def test_defect3_scheduler_honours_requests_against_node_capacity(kube: Client, namespace: str, cluster: LocalCluster) -> None:
    gpu = pod_manifest("wants-gpu", "print(1)", container={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
    kube.create("pods", gpu, namespace)
    p = kube.wait_for("pods", "wants-gpu", namespace, predicate=lambda p: condition(p, "PodScheduled") is not None,
                      timeout=10)
    n = len(cluster.nodes)
    assert condition(p, "PodScheduled")["status"] == "False"
    assert condition(p, "PodScheduled")["reason"] == "Unschedulable"
    assert condition(p, "PodScheduled")["message"] == f"0/{n} nodes are available: {n} Insufficient nvidia.com/gpu."
    assert not p["spec"].get("nodeName")
    fits = pod_manifest("fits", "print(1)", container={"resources": {"requests": {"cpu": "10m", "memory": "1Mi"}}})
    kube.create("pods", fits, namespace)
    assert wait_phase(kube, namespace, "fits", "Succeeded")["spec"]["nodeName"] in cluster.nodes


def test_issue11_item4_partitioned_node_keeps_processes_running_until_healed(
        cluster: LocalCluster, kube: Client, namespace: str) -> None:
    from localcluster.control import heal_node, partition_node

    node = cluster.nodes[-1]
    script = """
        import time
        while True:
            print("tick", flush=True)
            time.sleep(0.05)
    """
    kube.create("pods", pod_manifest("cutoff", script, nodeSelector={"kubernetes.io/hostname": node}), namespace)
    pod = wait_phase(kube, namespace, "cutoff", "Running")
    main = int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    try:
        partition_node(kube, node)
        n = kube.wait_for("nodes", node, predicate=lambda n: (condition(n, "Ready") or {}).get("status") == "Unknown",
                          timeout=10)
        assert (condition(n, "Ready") or {}).get("reason") == "NodeStatusUnknown"
        # The node lifecycle controller marked the pod unready; the process runs on.
        kube.wait_for("pods", "cutoff", namespace, predicate=lambda p: p is not None and (condition(p, "Ready") or {}).get("status") == "False",
                      timeout=10)
        assert not pid_gone(main)
        # Force-deleted from the API (what the operator does on a lost node): the cut-off kubelet does not know.
        kube.delete("pods", "cutoff", namespace, grace_period=0)
        wait_until(lambda: kube.get_or_none("pods", "cutoff", namespace) is None, timeout=10, what="the pod to go")
        ticks = pod_log(cluster, namespace, "cutoff").count("tick")
        wait_until(lambda: pod_log(cluster, namespace, "cutoff").count("tick") > ticks + 5, timeout=10,
                   what="the partitioned process to keep running")
        assert not pid_gone(main)
    finally:
        heal_node(kube, node)
    kube.wait_for("nodes", node, predicate=lambda n: (condition(n, "Ready") or {}).get("status") == "True", timeout=15)
    # Reconnected, the kubelet finds its pod gone and stops the process.
    wait_until(lambda: pid_gone(main), timeout=15, what="the healed node to stop the deleted pod's process")
