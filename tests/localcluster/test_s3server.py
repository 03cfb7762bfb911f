"""The stand-in's SeaweedFS server: ports it can keep, a start that survives a lost port race.

CI once lost a whole test module to ``SeaweedFS (weed mini) exited with 255``
with no cause printed: a port chosen with ``bind(0)`` comes from the kernel's
ephemeral range, which every parallel test's outgoing connections and
torchrun's stores draw from too.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from localcluster import s3
from localcluster.s3 import SeaweedS3Server, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process's socket listens on, as a lost race leaves it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", free_port()))
        sock.listen()
        yield sock.getsockname()[1]


def _first_port_taken(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """The S3 server's first port draw (its S3 port) returns ``port``; later draws are real."""
    real = s3.free_port
    calls = iter([port])
    monkeypatch.setattr(s3, "free_port", lambda host="127.0.0.1": next(calls, None) or real(host))


def test_free_ports_are_below_the_kernels_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(s3.FREE_PORT_LOW <= p < min(low, 55536) for p in ports), sorted(ports)
    assert len(ports) > 40  # drawn at random, not one port handed out again and again


def test_a_server_that_loses_its_port_is_started_again_on_fresh_ports_and_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    """One test for both (weed mini takes 20 s to exit on a taken port)."""
    _first_port_taken(monkeypatch, taken_port)
    server = SeaweedS3Server(log_path=tmp_path / "s3.log", data_dir=tmp_path / "data").start()
    try:
        assert server.port != taken_port
        assert server.create_bucket("after-retry") == "after-retry"
        assert "after-retry" in {b["Name"] for b in server.client().list_buckets()["Buckets"]}
        # The failed attempt's cause, from the server's own log, not only "exited with N (log: path)".
        said = capsys.readouterr().err
        assert "start 1 failed" in said and f"port {taken_port}" in said and "not available" in said, said
    finally:
        server.stop()
    assert server.pid is None
