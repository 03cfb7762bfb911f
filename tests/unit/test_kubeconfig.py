"""Real clusters: how the operator and ``kubectl tj`` find the API server and log in.

The exec plugin here is a real process (a Python script), run the way
client-go runs one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from trainingjob_operator.kubeconfig import ConfigError, load_config

PLUGIN = """\
import json, sys, pathlib
calls = pathlib.Path(sys.argv[1])
n = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
calls.write_text("x\\n" * n)
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": f"token-{n}", "expirationTimestamp": sys.argv[2]}}))
"""


def kubeconfig(path: Path, server: str, user: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user}]}))
    return path


@pytest.fixture
def in_cluster(tmp_path: Path) -> tuple[dict[str, str], str]:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token\n")
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, str(sa)


def test_real_clusters_explicit_kubeconfig_wins_over_the_pods_service_account(tmp_path, in_cluster, monkeypatch):
    env, sa = in_cluster
    monkeypatch.setattr("ssl.create_default_context", lambda cafile=None: None)  # no CA file in this test
    path = kubeconfig(tmp_path / "kc", "http://127.0.0.1:1", {"token": "user-token"})
    explicit = load_config(environ={**env, "KUBECONFIG": f"{tmp_path / 'missing'}:{path}"}, sa_dir=sa)
    assert (explicit.server, explicit.bearer_token()) == ("http://127.0.0.1:1", "user-token")
    pod = load_config(environ=env, sa_dir=sa)
    assert (pod.server, pod.bearer_token()) == ("https://10.96.0.1:443", "pod-token")
    assert "pod-token" not in repr(pod) and "user-token" not in repr(explicit)
    with pytest.raises(ConfigError, match=r"\$KUBECONFIG names no existing file"):
        load_config(environ={"KUBECONFIG": str(tmp_path / "missing")}, sa_dir=sa)


def test_real_clusters_exec_credential_is_cached_until_it_expires_and_renewed_after_a_401(tmp_path):
    script, calls = tmp_path / "plugin.py", tmp_path / "calls"
    script.write_text(PLUGIN)

    def config(expiry: str):
        calls.unlink(missing_ok=True)
        path = kubeconfig(tmp_path / "kc", "http://127.0.0.1:1", {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
            "args": [str(script), str(calls), expiry]}})
        return load_config(environ={"KUBECONFIG": str(path)})

    lasting = config("2999-01-01T00:00:00Z")
    assert [lasting.bearer_token(), lasting.bearer_token()] == ["token-1", "token-1"]  # one run, cached
    lasting.unauthorized()  # the server said 401
    assert lasting.bearer_token() == "token-2"
    expired = config("2000-01-01T00:00:00Z")
    assert [expired.bearer_token(), expired.bearer_token()] == ["token-1", "token-2"]  # renewed each time


def test_real_clusters_bad_exec_plugins_are_clear_errors(tmp_path):
    def load(exec_spec: dict):
        return load_config(environ={"KUBECONFIG": str(kubeconfig(tmp_path / "kc", "http://x", {"exec": exec_spec}))})

    with pytest.raises(ConfigError, match="'no-such-auth-plugin' is not on PATH"):
        load({"command": "no-such-auth-plugin"}).bearer_token()
    with pytest.raises(ConfigError, match="exec apiVersion 'client.authentication.k8s.io/v1alpha1'"):
        load({"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"})
    secretish = json.dumps({"status": {}, "leaked": "s3cr3t-value"})
    with pytest.raises(ConfigError, match="neither a token nor a client certificate") as err:
        load({"command": sys.executable, "args": ["-c", f"print({secretish!r})"]}).bearer_token()
    assert "s3cr3t" not in str(err.value)
