"""A moto S3 server on loopback, as a subprocess with a PID.

    server = S3Server(log_path="s3.log").start()
    server.create_bucket("snapshots")
    ... server.endpoint, server.env() ...
    server.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

#: Fake credentials moto accepts (it checks no signature).
ACCESS_KEY_ID = "localcluster-access-key"
SECRET_ACCESS_KEY = "localcluster-secret-key"
REGION = "us-east-1"
DEFAULT_BUCKET = "trainingjob-snapshots"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


class S3Server:
    """A ``moto.server`` subprocess on 127.0.0.1.

    Args:
        port: Port to listen on (default: a free one).
        log_path: File for the server's output (default: discarded).
    """

    def __init__(self, *, port: int | None = None, log_path: str | os.PathLike[str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or 0
        self.log_path = Path(log_path) if log_path else None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def attach(cls, endpoint: str, pid: int) -> "S3Server":
        """A handle on a server started elsewhere (for stop())."""
        srv = cls()
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

    def start(self, timeout: float = 30.0) -> "S3Server":
        if not self.port:
            self.port = free_port(self.host)
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode} (log: {self.log_path})")
            try:
                requests.get(self.endpoint + "/moto-api/", timeout=1)
                return self
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server not answering on {self.endpoint} after {timeout}s") from None
                time.sleep(0.1)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
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
