"""A real local S3 server for tests: ``moto.server`` in a subprocess on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from trainingjob_trainer import contract

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        proc: The server process.
    """

    endpoint: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """The contract env pointing a trainer at this server."""
        return {
            contract.ENV_S3_ENDPOINT: self.endpoint,
            contract.ENV_S3_REGION: REGION,
            contract.SECRET_KEY_ACCESS_KEY_ID: ACCESS_KEY,
            contract.SECRET_KEY_SECRET_ACCESS_KEY: SECRET_KEY,
        }

    def stop(self) -> None:
        """Stop the server by PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_s3_server(*, port: int | None = None) -> S3Server:
    """Start ``python -m moto.server`` on ``port`` (default: a free loopback port) and wait until it answers."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return S3Server(endpoint=endpoint, proc=proc)
        except OSError:
            time.sleep(0.1)
    S3Server(endpoint=endpoint, proc=proc).stop()
    raise RuntimeError("moto server did not start in 30 s")
