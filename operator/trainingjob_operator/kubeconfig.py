"""How the operator and ``kubectl tj`` find the API server and log in.

The order is controller-runtime's (``ctrl.GetConfig``):

1. ``$KUBECONFIG`` when it is set (its first existing file);
2. the in-cluster service account (``KUBERNETES_SERVICE_HOST`` and the
   mounted token);
3. ``~/.kube/config``.

So a kubeconfig the user points at explicitly wins over the pod's own
identity, and the operator in its pod (no ``$KUBECONFIG``) uses its
ServiceAccount.

Credentials a kubeconfig user can have, as kubectl reads them: ``token``,
``tokenFile``, client certificates (files or ``-data``), and an ``exec``
credential plugin (``client.authentication.k8s.io/v1`` or ``v1beta1``), which
is how EKS (``aws eks get-token``), GKE (``gke-gcloud-auth-plugin``) and AKS
(``kubelogin``) log in. The plugin's command comes from the user's own
kubeconfig, never from a TrainingJob; it runs without a shell, with the
kubeconfig's ``env`` added and ``KUBERNETES_EXEC_INFO`` set as client-go sets
it. Its credential is cached until its ``expirationTimestamp`` (or for the
life of the process when it has none, as client-go does), and dropped on a
401 so the next request runs the plugin again. Credentials are never logged:
an error names the user and the plugin, not what it printed on stdout.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

import yaml

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Seconds a service-account token file is trusted before it is re-read (projected tokens rotate).
TOKEN_FILE_SECONDS = 60.0
#: An exec credential is renewed this many seconds before it expires.
EXEC_EXPIRY_MARGIN_SECONDS = 10.0
#: Seconds an exec plugin may run before it counts as failed.
EXEC_TIMEOUT_SECONDS = 60.0
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


class ConfigError(Exception):
    """The kubeconfig cannot be used; the message says which part and why (no credential)."""


@dataclass
class ExecSpec:
    """A kubeconfig user's ``exec`` credential plugin."""

    user: str
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = EXEC_API_VERSIONS[0]

    def run(self) -> tuple[str | None, float | None, tuple[str, str] | None]:
        """Run the plugin once.

        Returns:
            ``(token, expires_at, (cert_pem, key_pem) or None)``, ``expires_at``
            in ``time.time()`` seconds, or None when the credential has no expiry.

        Raises:
            ConfigError: The plugin is missing, failed, timed out or printed no credential.
        """
        env = dict(os.environ)
        env.update(dict(self.env))
        env["KUBERNETES_EXEC_INFO"] = json.dumps(
            {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}})
        where = f"kubeconfig user {self.user!r}: exec plugin {self.command!r}"
        try:
            done = subprocess.run([self.command, *self.args], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=EXEC_TIMEOUT_SECONDS, check=False)
        except FileNotFoundError:
            raise ConfigError(f"{where} is not on PATH") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{where} did not answer within {EXEC_TIMEOUT_SECONDS:.0f} s") from None
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:300]
            raise ConfigError(f"{where} exited with {done.returncode}: {last}")
        try:
            cred = json.loads(done.stdout)
            status = cred.get("status") or {}
        except (ValueError, AttributeError):
            raise ConfigError(f"{where} printed no ExecCredential JSON") from None
        token = status.get("token") or None
        pair = (status["clientCertificateData"], status["clientKeyData"]) if status.get("clientCertificateData") else None
        if token is None and pair is None:
            raise ConfigError(f"{where} printed an ExecCredential with neither a token nor a client certificate")
        expires = status.get("expirationTimestamp")
        try:
            expires_at = datetime.fromisoformat(str(expires).replace("Z", "+00:00")).timestamp() if expires else None
        except ValueError:
            raise ConfigError(f"{where}: expirationTimestamp {expires!r} is not an RFC 3339 time") from None
        return token, expires_at, pair


@dataclass
class Config:
    """Where the API server is and how to log in to it.

    Use :meth:`bearer_token` for every request: it reads a token file or runs
    an exec plugin as needed (thread-safe), and :meth:`unauthorized` after a
    401 so the next call renews the credential.
    """

    server: str
    token: str | None = None
    token_path: str | None = None
    ssl_context: ssl.SSLContext | bool | None = None
    exec_spec: ExecSpec | None = None
    #: The files behind ``ssl_context`` (Kopf's login takes paths, not a context).
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    _cache: tuple[float, str | None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:  # never print a credential
        how = "token" if self.token else "token-file" if self.token_path else "exec" if self.exec_spec else "none"
        return f"Config(server={self.server!r}, auth={how})"

    def bearer_token(self) -> str | None:
        """The token to send now (None: send none).

        Raises:
            ConfigError: The exec plugin failed.
        """
        if self.token_path is None and self.exec_spec is None:
            return self.token
        with self._lock:
            now = time.time()
            if self._cache is not None and now < self._cache[0]:
                return self._cache[1]
            if self.token_path is not None:
                with open(self.token_path, encoding="utf-8") as f:
                    self._cache = (now + TOKEN_FILE_SECONDS, f.read().strip())
                return self._cache[1]
            assert self.exec_spec is not None
            token, expires_at, pair = self.exec_spec.run()
            if pair is not None:
                self._load_client_pair(*pair)
            until = float("inf") if expires_at is None else expires_at - EXEC_EXPIRY_MARGIN_SECONDS
            self._cache = (until, token)
            return token

    def expires_at(self) -> float | None:
        """``time.time()`` when the current exec credential must be renewed (None: no expiry)."""
        with self._lock:
            until = self._cache[0] if self._cache is not None and self.exec_spec is not None else None
        return until if until is not None and until != float("inf") else None

    def unauthorized(self) -> None:
        """The server answered 401: forget the cached credential (the next call renews it)."""
        with self._lock:
            self._cache = None

    def _load_client_pair(self, cert_pem: str, key_pem: str) -> None:
        if not isinstance(self.ssl_context, ssl.SSLContext):
            raise ConfigError("an exec plugin returned a client certificate, but the server is not https")
        self.cert_path, self.key_path = _write_temp(cert_pem.encode()), _write_temp(key_pem.encode())
        self.ssl_context.load_cert_chain(self.cert_path, self.key_path)


def _write_temp(data: bytes) -> str:
    f = tempfile.NamedTemporaryFile("wb", delete=False, prefix="tj-kube-")
    f.write(data)
    f.close()
    os.chmod(f.name, 0o600)
    return f.name


def _data_or_file(section: Mapping[str, Any], key: str) -> str | None:
    """``key`` (a path) or ``key-data`` (base64) of a kubeconfig section, as a path."""
    if section.get(key):
        return str(section[key])
    if section.get(f"{key}-data"):
        return _write_temp(base64.b64decode(section[f"{key}-data"]))
    return None


def _exec_spec(user_name: str, spec: Mapping[str, Any]) -> ExecSpec:
    version = spec.get("apiVersion") or EXEC_API_VERSIONS[0]
    if version not in EXEC_API_VERSIONS:
        raise ConfigError(f"kubeconfig user {user_name!r}: exec apiVersion {version!r} is not one of {list(EXEC_API_VERSIONS)}")
    if not spec.get("command"):
        raise ConfigError(f"kubeconfig user {user_name!r}: exec has no command")
    env = tuple((str(e["name"]), str(e.get("value", ""))) for e in spec.get("env") or [])
    return ExecSpec(user=user_name, command=str(spec["command"]), args=tuple(str(a) for a in spec.get("args") or ()),
                    env=env, api_version=version)


def _named(entries: Any, name: str, what: str, path: str) -> Mapping[str, Any]:
    for e in entries or []:
        if isinstance(e, Mapping) and e.get("name") == name:
            return e.get(what) or {}
    raise ConfigError(f"{path}: no {what} named {name!r}")


def from_kubeconfig(path: str) -> Config:
    """A :class:`Config` from the current context of the kubeconfig at ``path``.

    Raises:
        ConfigError: The file is missing or malformed, or names what it lacks.
    """
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the kubeconfig {path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Mapping) or not cfg.get("current-context"):
        raise ConfigError(f"{path}: no current-context")
    context = _named(cfg.get("contexts"), cfg["current-context"], "context", path)
    cluster = _named(cfg.get("clusters"), context.get("cluster"), "cluster", path)
    user_name = context.get("user")
    user = _named(cfg.get("users"), user_name, "user", path) if user_name else {}
    if not cluster.get("server"):
        raise ConfigError(f"{path}: cluster {context.get('cluster')!r} has no server")
    server = str(cluster["server"]).rstrip("/")
    sslctx: ssl.SSLContext | bool | None = None
    ca = cert = key = None
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            sslctx = False
        else:
            ca = _data_or_file(cluster, "certificate-authority")
            sslctx = ssl.create_default_context(cafile=ca)
        cert, key = _data_or_file(user, "client-certificate"), _data_or_file(user, "client-key")
        if cert and isinstance(sslctx, ssl.SSLContext):
            sslctx.load_cert_chain(cert, key)
    return Config(server=server, token=user.get("token"), token_path=user.get("tokenFile"), ssl_context=sslctx,
                  exec_spec=_exec_spec(str(user_name), user["exec"]) if user.get("exec") else None,
                  ca_path=ca, cert_path=cert, key_path=key)


def load_config(*, environ: Mapping[str, str] | None = None, sa_dir: str = SA_DIR) -> Config:
    """The API server and credentials, in controller-runtime's order (see the module docstring).

    Raises:
        ConfigError: None of the three is usable; the message says what was tried.
    """
    env = os.environ if environ is None else environ
    explicit = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if explicit:
        existing = [p for p in explicit if os.path.exists(p)]
        if not existing:
            raise ConfigError(f"$KUBECONFIG names no existing file: {explicit}")
        return from_kubeconfig(existing[0])
    token_path = os.path.join(sa_dir, "token")
    if env.get("KUBERNETES_SERVICE_HOST") and os.path.exists(token_path):
        host, port = env["KUBERNETES_SERVICE_HOST"], env.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"  # IPv6 service address
        ca = os.path.join(sa_dir, "ca.crt")
        return Config(server=f"https://{host}:{port}", token_path=token_path,
                      ssl_context=ssl.create_default_context(cafile=ca), ca_path=ca)
    home = os.path.expanduser("~/.kube/config")
    if os.path.exists(home):
        return from_kubeconfig(home)
    raise ConfigError("no $KUBECONFIG, not in a cluster (no service account token), and no ~/.kube/config")
