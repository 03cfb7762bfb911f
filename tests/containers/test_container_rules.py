"""Issue 11 item 2, the pure parts of container nodes: how a pod spec becomes podman flags (no podman runs)."""

from __future__ import annotations

import json

import pytest

from localcluster.containers import entrypoint_flags, own_hosts_line, parse_quantity, pod_hosts, security_flags
from localcluster.nodeagent import ConfigError


@pytest.mark.parametrize("value,expected", [("96Mi", 96 * 2**20), ("1G", 10**9), ("250m", 0.25), ("2", 2), ("1.5Gi", 1.5 * 2**30)])
def test_issue11_quantities(value, expected):
    assert parse_quantity(value) == expected


def test_issue11_bad_quantity_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_quantity("lots")


def test_issue11_command_replaces_entrypoint_args_replace_cmd():
    env = {"N": "3"}
    assert entrypoint_flags({"command": ["python", "-m", "x"], "args": ["--n", "$(N)"]}, env) == \
        (["--entrypoint", json.dumps(["python", "-m", "x"])], ["--n", "3"])
    assert entrypoint_flags({"args": ["--help"]}, env) == ([], ["--help"])  # ENTRYPOINT kept
    assert entrypoint_flags({}, env) == ([], [])  # both image defaults


def test_issue11_security_context_flags():
    flags = security_flags({"runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": False})
    assert flags == ["--user", "10001:10001", "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL",
                     "--security-opt", "no-new-privileges"]


def test_issue11_pod_hosts_own_line_first_and_no_v4_mapped_lines():
    agent = b"127.0.0.1 localhost\n127.0.0.1 j-0-0.j-0\n::ffff:127.0.0.1 j-0-0.j-0\n"
    own = own_hosts_line({"metadata": {"name": "j-0-1", "namespace": "ns"},
                          "spec": {"hostname": "j-0-1", "subdomain": "j-0"}})
    assert own == b"127.0.0.1 j-0-1.j-0.ns.svc.cluster.local j-0-1\n"
    assert pod_hosts(agent, own) == own + b"127.0.0.1 localhost\n127.0.0.1 j-0-0.j-0\n"


def test_issue11_make_images_under_the_callers_heavy_lock_does_not_deadlock(tmp_path):
    """``flock /tmp/tj-heavy.lock make demo MODE=containers`` builds images: the build must not wait on its parent."""
    import subprocess
    import sys

    lock = tmp_path / "heavy.lock"
    code = ("from pathlib import Path; import localcluster.images as im\n"
            f"im.HEAVY_LOCK = Path({str(lock)!r})\n"
            "with im.heavy_lock(): print('built')\n")
    proc = subprocess.Popen(["flock", str(lock), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "built" in stdout
