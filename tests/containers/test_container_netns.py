"""Issue 11 item 3 on container nodes: podman joins the pod's own network namespace.

A container pod of a ``network="netns"`` stand-in runs with ``--network
ns:/run/netns/NAME``: its address is the pod's IP (first line of its
/etc/hosts, ``status.podIP``), it binds the rendezvous port in its own port
space and reaches the API server on the gateway from that address.
"""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest

from tests.conftest import running_cluster
from tests.containers.test_container_pods import pod, terminated
from trainingjob_trainer import contract

pytestmark = [pytest.mark.slow]

CHECK = textwrap.dedent(f"""
    import json, socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    srv = socket.create_server(("", {contract.RDZV_PORT}))
    first = open("/etc/hosts").readline().split()
    conn = socket.create_connection((host, port), timeout=5)
    out = {{"hosts_ip": first[0], "hostname": socket.gethostname(), "own": socket.gethostbyname(socket.gethostname()),
           "src": conn.getsockname()[0]}}
    open("/dev/termination-log", "w").write(json.dumps(out))
""")


def test_issue11_item3_container_pod_in_its_own_network_namespace(images):
    with running_cluster(prefix="lcpn-", nodes=("cnode-0",), runtime="podman", network="netns", with_s3=False) as lc:
        kube = lc.client()
        api_port = lc.api_url.rsplit(":", 1)[1]
        for name in ("one", "two"):  # both bind 29400: two port spaces
            body = pod(name, images["trainer"], command=["python", "-c", CHECK], args=[lc.net.gateway, api_port])
            kube.create("pods", body, "default")
        got = {}
        for name in ("one", "two"):
            state = terminated(kube, "default", name)
            assert state["exitCode"] == 0, (state, (lc.state_dir / "pods" / "default" / name / "main.log").read_text()[-2000:])
            got[name] = (json.loads(state["message"]), kube.get("pods", name, "default")["status"]["podIP"])
        subnet = ipaddress.ip_network(f"{lc.net.gateway}/24", strict=False)
        assert got["one"][1] != got["two"][1]
        for name, (msg, ip) in got.items():
            assert ipaddress.ip_address(ip) in subnet
            assert msg == {"hosts_ip": ip, "hostname": name, "own": ip, "src": ip}, msg
