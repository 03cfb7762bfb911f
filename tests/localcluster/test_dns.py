"""The stand-in's cluster DNS answers like CoreDNS for headless Services (issue 9, the strict stand-in).

A pod's ``<hostname>.<subdomain>`` names exist only while a Service named
like the subdomain selects the pod and the pod is Ready with an IP, unless
the Service publishes not-ready addresses. Before, every pod with a
subdomain resolved, Service or not.
"""

from __future__ import annotations

from localcluster.dns import dns_names


def _pod(name: str, *, labels: dict, ready: bool, ip: bool = True, subdomain: str = "gang", ns: str = "t") -> dict:
    status: dict = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = "127.0.0.1"
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"hostname": name, "subdomain": subdomain}, "status": status}


def _svc(name: str, selector: dict, *, not_ready: bool = False, ns: str = "t") -> dict:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": not_ready}}


FQDN = "{}.gang.t.svc.cluster.local"


def test_strict_dns_pod_names_only_behind_a_selecting_headless_service() -> None:
    pods = [_pod("a", labels={"app": "x"}, ready=True), _pod("b", labels={"app": "other"}, ready=True)]
    assert FQDN.format("a") not in dns_names(pods, [])  # no Service: no pod record
    names = dns_names(pods, [_svc("gang", {"app": "x"})])
    assert FQDN.format("a") in names and "a.gang" in names
    assert FQDN.format("b") not in names  # not selected
    assert "gang.t.svc.cluster.local" in names
    assert FQDN.format("a") not in dns_names(pods, [_svc("gang", {"app": "x"}, ns="elsewhere")])


def test_strict_dns_not_ready_pods_only_with_publish_not_ready_addresses() -> None:
    pods = [_pod("a", labels={"app": "x"}, ready=False), _pod("c", labels={"app": "x"}, ready=True, ip=False)]
    names = dns_names(pods, [_svc("gang", {"app": "x"})])
    assert FQDN.format("a") not in names and FQDN.format("c") not in names
    names = dns_names(pods, [_svc("gang", {"app": "x"}, not_ready=True)])
    assert FQDN.format("a") in names and FQDN.format("c") in names
