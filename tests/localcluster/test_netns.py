"""Issue 11 item 3: a network namespace and a real IP per pod (``LocalCluster(network="netns")``).

These tests need root with CAP_NET_ADMIN (as CI has, on the same machine
type): without it the cluster fails to start and they fail, never skip.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from localcluster import control, netns
from localcluster.cluster import LocalCluster
from localcluster.kube import wait_until
from tests.conftest import fresh_namespace, running_cluster
from tests.localcluster.test_nodeagent import phase, pod_log, pod_manifest, terminated, wait_phase
from trainingjob_trainer import contract

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def net_cluster() -> Iterator[LocalCluster]:
    with running_cluster(prefix="lcn-", network="netns", nodes=("node-0", "node-1")) as lc:
        yield lc


@pytest.fixture
def ns(net_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(net_cluster.client(), request, prefix="n") as name:
        yield name


def _service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": True}}


def _subnet(lc: LocalCluster) -> ipaddress.IPv4Network:
    assert lc.net is not None
    return ipaddress.ip_network(f"{lc.net.gateway}/24", strict=False)


def test_issue11_netns_pods_have_own_ips_and_both_listen_on_the_rendezvous_port(net_cluster: LocalCluster, ns: str) -> None:
    """Two pods on one node bind port 29400 at once, reach each other by DNS name, and reach
    S3 and the API server on the gateway, but nothing off the subnet."""
    kube = net_cluster.client()
    kube.create("services", _service("gang", {"app": "t"}), ns)
    s3_port = net_cluster.s3_endpoint.rsplit(":", 1)[1]
    api_port = net_cluster.api_url.rsplit(":", 1)[1]
    script = f"""
        import json, os, socket, sys, time
        me, peer = sys.argv[1], sys.argv[2]
        srv = socket.create_server(("", {contract.RDZV_PORT}))
        out = {{"hostname": socket.gethostname(), "self": socket.gethostbyname(me),
               "env_ip": os.environ["POD_IP"], "host_ip": os.environ["HOST_IP"]}}
        fqdn = f"{{peer}}.gang.{ns}.svc.cluster.local"
        deadline = time.monotonic() + 30
        while True:
            try:
                out["peer"] = socket.gethostbyname(fqdn)
                socket.create_connection((fqdn, {contract.RDZV_PORT}), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "peer never reachable"
                time.sleep(0.1)
        for name, port in (("s3", {s3_port}), ("api", {api_port})):
            socket.create_connection((os.environ["HOST_IP"], port), timeout=2).close()
            out[name] = "ok"
        try:
            socket.create_connection(("192.0.2.1", 80), timeout=2)
            out["off_subnet"] = "reached"
        except OSError as e:
            out["off_subnet"] = e.strerror
        srv.settimeout(30)
        srv.accept()  # the peer's connection (it may come before or after ours)
        open(os.environ["{contract.ENV_TERMINATION_MESSAGE_PATH}"], "w").write(json.dumps(out))
    """
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]
    for me, peer in (("a", "b"), ("b", "a")):
        body = pod_manifest(me, script, env=env, hostname=me, subdomain="gang", nodeName="node-0")
        body["spec"]["containers"][0]["args"] = [me, peer]
        kube.create("pods", body, ns)
    pods = {n: wait_phase(kube, ns, n, "Succeeded", "Failed", timeout=60) for n in ("a", "b")}
    for n, pod in pods.items():
        assert phase(pod) == "Succeeded", pod_log(net_cluster, ns, n)[-3000:]
    got = {n: json.loads(terminated(p)["message"]) for n, p in pods.items()}
    ips = {n: p["status"]["podIP"] for n, p in pods.items()}
    assert ips["a"] != ips["b"] and all(ipaddress.ip_address(ip) in _subnet(net_cluster) for ips_ in [ips] for ip in ips_.values())
    for me, peer in (("a", "b"), ("b", "a")):
        g = got[me]
        assert g["hostname"] == me and g["self"] == g["env_ip"] == ips[me]
        assert g["peer"] == ips[peer]
        assert g["host_ip"] == pods[me]["status"]["hostIP"] == net_cluster.net.gateway
        assert g["s3"] == g["api"] == "ok"
        assert g["off_subnet"] == "Network is unreachable", g


PROBE = """
    import socket, sys, time
    host, api, s3 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def probe(port):
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return "ok"
        except OSError:
            return "down"
    while True:
        print(f"probe api={probe(api)} s3={probe(s3)}", flush=True)
        time.sleep(0.1)
"""


def _last_probe(lc: LocalCluster, ns: str, name: str) -> str:
    lines = [ln for ln in pod_log(lc, ns, name).splitlines() if ln.startswith("probe ")]
    return lines[-1] if lines else ""


def _probes_after(lc: LocalCluster, ns: str, name: str, mark: int) -> list[str]:
    return [ln for ln in pod_log(lc, ns, name).splitlines()[mark:] if ln.startswith("probe ")]


def test_issue11_cut_node_drops_api_server_traffic_keeps_s3_and_processes(net_cluster: LocalCluster, ns: str) -> None:
    kube = net_cluster.client()
    gw, api, s3 = net_cluster.net.gateway, net_cluster.api_url.rsplit(":", 1)[1], net_cluster.s3_endpoint.rsplit(":", 1)[1]
    for name, node in (("cut", "node-1"), ("other", "node-0")):
        body = pod_manifest(name, PROBE, nodeName=node)
        body["spec"]["containers"][0]["args"] = [gw, api, s3]
        kube.create("pods", body, ns)
        wait_phase(kube, ns, name, "Running")
    for name in ("cut", "other"):
        wait_until(lambda: _last_probe(net_cluster, ns, name) == "probe api=ok s3=ok", timeout=20, what=f"{name} probing")
    namespaces = net_cluster.network_namespaces()
    mark = len(pod_log(net_cluster, ns, "cut").splitlines())
    assert len(namespaces.cut_node("node-1")) == 1
    # Every probe after the cut: the API server unreachable, S3 reachable, the process alive.
    wait_until(lambda: len(_probes_after(net_cluster, ns, "cut", mark + 1)) >= 3, timeout=20, what="probes after the cut")
    after = _probes_after(net_cluster, ns, "cut", mark + 1)
    assert set(after) == {"probe api=down s3=ok"}, after
    assert _last_probe(net_cluster, ns, "other") == "probe api=ok s3=ok"  # node-0 is not cut
    # A pod started on the cut node is cut from its start.
    body = pod_manifest("late", PROBE, nodeName="node-1")
    body["spec"]["containers"][0]["args"] = [gw, api, s3]
    kube.create("pods", body, ns)
    wait_phase(kube, ns, "late", "Running")
    wait_until(lambda: _last_probe(net_cluster, ns, "late") == "probe api=down s3=ok", timeout=30, what="late pod cut")
    assert len(namespaces.restore_node("node-1")) == 2
    for name in ("cut", "late"):
        wait_until(lambda: _last_probe(net_cluster, ns, name) == "probe api=ok s3=ok", timeout=20, what=f"{name} restored")
    assert phase(kube.get("pods", "cut", ns)) == "Running"


def test_issue11_namespaces_go_with_their_pods(net_cluster: LocalCluster, ns: str) -> None:
    kube = net_cluster.client()
    index = net_cluster.net.index
    before = set(netns.netns_names(index))
    kube.create("pods", pod_manifest("brief", "print('hi')"), ns)
    wait_phase(kube, ns, "brief", "Succeeded")
    kube.create("pods", pod_manifest("long", "import time; time.sleep(300)"), ns)
    wait_phase(kube, ns, "long", "Running")
    mine = set(netns.netns_names(index)) - before
    assert len(mine) == 1, mine  # the finished pod's namespace is gone, the running one's is there
    kube.delete("pods", "long", ns, grace_period=1)
    wait_until(lambda: not (set(netns.netns_names(index)) & mine), timeout=20, what="the deleted pod's namespace removed")


def _bridge_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def test_issue11_stand_in_removes_its_network_at_stop_and_after_a_crash(tmp_path: Path) -> None:
    lc = LocalCluster(tmp_path / "lc", nodes=("node-0",), with_s3=False, network="netns")
    lc.start()
    try:
        kube = lc.client()
        kube.create("pods", pod_manifest("sleeper", "import time; time.sleep(300)"), "default")
        wait_phase(kube, "default", "sleeper", "Running")
        index, bridge = lc.net.index, lc.net.bridge
        assert len(netns.netns_names(index)) == 1 and _bridge_exists(bridge)
    finally:
        lc.stop()
    assert netns.netns_names(index) == [] and not _bridge_exists(bridge)
    assert not (netns.RUN_DIR / f"{index}.json").exists()

    # A crash: a claim whose owner is dead, its bridge and a pod namespace left behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = netns.ClusterNetwork.claim(state_dir=tmp_path / "crashed")
    leftover.claim_path.write_text(json.dumps({"stateDir": str(tmp_path / "crashed"),
                                               "owners": [{"pid": dead.pid, "start": "1"}]}))
    pods = netns.NetworkNamespaces(index=leftover.index, state_dir=tmp_path / "crashed")
    pods.create(uid="u", node="node-0")
    assert netns.netns_names(leftover.index) and _bridge_exists(leftover.bridge)
    assert leftover.index in netns.clean_leftovers()
    assert netns.netns_names(leftover.index) == [] and not _bridge_exists(leftover.bridge)
    assert not leftover.claim_path.exists()


def test_issue11_netns_missing_tools_fail_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ip, nsenter, iptables
    with pytest.raises(netns.NetnsError, match="localcluster.tools install"):
        netns.ClusterNetwork.claim(state_dir=tmp_path)


def test_issue11_netns_dns_records_map_names_to_each_pods_own_ip() -> None:
    """With a network per pod, names map to the pods' own IPs; a headless Service's name to the
    pods it publishes, and no record when it publishes none (pure: no cluster)."""
    from localcluster.dns import dns_records

    def pod(name: str, ip: str) -> dict:
        return {"metadata": {"name": name, "namespace": "t", "uid": name, "labels": {"job": "j"}},
                "spec": {"hostname": name, "subdomain": "gang"},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}

    ips = {"j-0": "10.244.7.2", "j-1": "10.244.7.3"}
    pods = [pod(n, ip) for n, ip in ips.items()]
    services = [{"metadata": {"name": "gang", "namespace": "t"}, "spec": {"clusterIP": "None", "selector": {"job": "j"}}},
                {"metadata": {"name": "empty", "namespace": "t"}, "spec": {"clusterIP": "None", "selector": {"job": "x"}}}]
    records = dns_records(pods, services, pod_ip=lambda p: ips[p["metadata"]["name"]], service_fallback=None)
    assert records["j-0"] == ["10.244.7.2"] and records["j-1.gang.t.svc.cluster.local"] == ["10.244.7.3"]
    assert records["gang.t.svc.cluster.local"] == ["10.244.7.2", "10.244.7.3"]
    assert not any(n.startswith("empty") for n in records)
    # A pod without an address yet has no record at all.
    assert "j-1" not in dns_records(pods, services, pod_ip=lambda p: ips.get(p["metadata"]["name"]) if p["metadata"]["name"] == "j-0" else None)


def test_issue11_partition_node_cuts_the_pods_link_to_the_api_server(net_cluster: LocalCluster, ns: str) -> None:
    """``control.partition_node`` with a network per pod: the agent's side and the real link go together."""
    kube = net_cluster.client()
    gw, api, s3 = net_cluster.net.gateway, net_cluster.api_url.rsplit(":", 1)[1], net_cluster.s3_endpoint.rsplit(":", 1)[1]
    body = pod_manifest("parted", PROBE, nodeName="node-1")
    body["spec"]["containers"][0]["args"] = [gw, api, s3]
    kube.create("pods", body, ns)
    wait_phase(kube, ns, "parted", "Running")
    wait_until(lambda: _last_probe(net_cluster, ns, "parted") == "probe api=ok s3=ok", timeout=20, what="probing")
    control.partition_node(kube, "node-1")
    try:
        wait_until(lambda: _last_probe(net_cluster, ns, "parted") == "probe api=down s3=ok", timeout=20,
                   what="the partitioned pod cut from the API server, still reaching S3")
    finally:
        control.heal_node(kube, "node-1")
    wait_until(lambda: _last_probe(net_cluster, ns, "parted") == "probe api=ok s3=ok", timeout=20, what="healed")
    assert phase(kube.get("pods", "parted", ns)) == "Running"
