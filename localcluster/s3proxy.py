"""A fault-injecting HTTP proxy in front of an S3 server (dev/test only).

Runs as its own process on loopback and forwards every request to the
upstream S3 server, adding the faults it is told to::

    python -m localcluster.s3proxy --upstream http://127.0.0.1:9000 --port 9100

    proxy = S3Proxy(upstream=server.endpoint).start()
    proxy.set_faults(bandwidth_bps=1 << 20)               # 1 MiB/s each way
    proxy.set_faults(fail="503", fail_for_s=5, methods=["PUT"])
    ... clients use proxy.endpoint instead of the server's ...
    proxy.stop()                                          # by PID

Faults (all optional; :meth:`S3Proxy.set_faults` replaces the whole set and
its time window starts when it is set):

* ``latency_s``: added before each request is forwarded;
* ``bandwidth_bps``: a cap in bytes/s per direction, shared by every
  connection (one link), applied to request and response bodies and heads;
* ``fail``: ``"503"`` (an S3 ``SlowDown`` error response, the request body
  read and dropped), ``"reset"`` (the client connection is reset with a TCP
  RST once the request's head has arrived) or ``"cut"`` (the response's head
  and its first ``cut_after_bytes`` body bytes are sent, then the connection
  is closed: a download that ends early; closed, not reset, so the client
  reads every byte sent, as it would not after an RST), for the requests that match:
  ``methods`` (default all), ``path_contains`` (a substring of the request
  target, e.g. one snapshot folder's name; default any), inside the window ``[fail_after_s, fail_after_s
  + fail_for_s)`` after the faults were set (``fail_for_s`` ``None``: no end),
  and picked with probability ``fail_share`` (seeded by ``seed``).

Control endpoint (same port, path prefix ``/__proxy__``; S3 bucket names
cannot contain ``_`` so it never collides): ``PUT /__proxy__/faults`` with a
JSON body, ``GET /__proxy__/stats`` for counters (requests, injected faults,
bytes each way, requests in flight now and at most at once). The proxy speaks HTTP/1.1 with keep-alive, bodies by
``Content-Length`` or chunked, answers ``Expect: 100-continue`` itself, and
streams bodies in chunks (it never holds a whole object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

CONTROL_PREFIX = "/__proxy__"
CHUNK = 1 << 18  # 256 KiB: bodies move in pieces of at most this size
FAIL_KINDS = ("503", "reset", "cut")
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate. (injected by s3proxy)</Message></Error>")


@dataclass
class Faults:
    """The faults in force (see the module docstring)."""

    latency_s: float = 0.0
    bandwidth_bps: float | None = None
    fail: str | None = None
    fail_share: float = 1.0
    fail_after_s: float = 0.0
    fail_for_s: float | None = None
    methods: list[str] | None = None
    path_contains: str | None = None
    cut_after_bytes: int = 1 << 16
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Faults":
        """Validated faults from JSON; raises ``ValueError`` on bad input."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}")
        f = cls(**data)
        if f.fail is not None and f.fail not in FAIL_KINDS:
            raise ValueError(f"fail must be one of {FAIL_KINDS}, got {f.fail!r}")
        if f.bandwidth_bps is not None and f.bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be positive")
        if not 0.0 <= f.fail_share <= 1.0 or f.latency_s < 0:
            raise ValueError("fail_share must be in [0, 1] and latency_s >= 0")
        return f


@dataclass
class _Stats:
    requests: int = 0
    failed_503: int = 0
    failed_reset: int = 0
    failed_cut: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    #: Requests forwarded and not yet answered, now and at most at once.
    in_flight: int = 0
    peak_in_flight: int = 0


class _Throttle:
    """A token bucket of ``rate`` bytes/s shared by every user (no burst beyond one chunk)."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._next = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate  # when the link is free again
        if self._next > now:
            await asyncio.sleep(self._next - now)


class _Reset(Exception):
    """The connection must be reset (injected)."""


class _Cut(Exception):
    """The connection must be closed before the response's body ended (injected)."""


class ProxyServer:
    """The asyncio proxy (in the proxy process).

    Args:
        upstream: ``http://host:port`` of the S3 server.
    """

    def __init__(self, *, upstream: str) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.stats = _Stats()
        self.up = _Throttle()
        self.down = _Throttle()
        self._rng = random.Random(0)
        self.set_faults(Faults())

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.faults_at = time.monotonic()
        self._rng = random.Random(faults.seed)
        self.up.rate = self.down.rate = faults.bandwidth_bps

    def _pick_fault(self, method: str, target: str) -> str | None:
        f = self.faults
        if f.fail is None or (f.methods and method not in f.methods) or \
                (f.path_contains and f.path_contains not in target):
            return None
        age = time.monotonic() - self.faults_at
        if age < f.fail_after_s or (f.fail_for_s is not None and age >= f.fail_after_s + f.fail_for_s):
            return None
        return f.fail if self._rng.random() < f.fail_share else None

    # ------------------------------------------------------------ connections
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                upstream = await self._one_request(head, reader, writer, upstream)
        except _Reset:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        except _Cut:
            return  # closed below, after what was written is sent
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            if not writer.transport.is_closing():
                writer.close()

    async def _one_request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           upstream: Any) -> Any:
        method, target, headers = _parse_head(head)
        if target.startswith(CONTROL_PREFIX):
            body = await _read_body_whole(reader, headers)
            await self._control(method, target, body, writer)
            return upstream
        self.stats.requests += 1
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        fault = self._pick_fault(method, target)
        if fault == "reset":
            self.stats.failed_reset += 1
            raise _Reset()
        expect = _header(headers, "expect")
        if expect and expect.lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            head = _drop_header(head, "expect")
        if fault == "503":
            self.stats.failed_503 += 1
            await _pump_body(reader, None, headers, self.up, lambda n: None)
            _write_response(writer, 503, "Slow Down", _SLOWDOWN_BODY, content_type="application/xml")
            await writer.drain()
            return upstream
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            if self.faults.latency_s:
                await asyncio.sleep(self.faults.latency_s)
            if upstream is None or upstream[1].transport.is_closing():
                upstream = await asyncio.open_connection(self.up_host, self.up_port)
            up_r, up_w = upstream
            await self.up.take(len(head))
            up_w.write(head)
            await _pump_body(reader, up_w, headers, self.up, self._count_up)
            if fault == "cut":
                self.stats.failed_cut += 1
            keep = await self._relay_response(method, up_r, writer,
                                              cut=self.faults.cut_after_bytes if fault == "cut" else None)
        finally:
            self.stats.in_flight -= 1
        if not keep:
            up_w.close()
            return None
        return upstream

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n

    async def _relay_response(self, method: str, up_r: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              *, cut: int | None = None) -> bool:
        """Copy one response (skipping interim 1xx from upstream); whether upstream stays open.
        With ``cut``, the client connection is closed after that many body bytes."""
        while True:
            head = await _read_head(up_r)
            if head is None:
                raise ConnectionError("upstream closed the connection")
            status = int(head.split(b" ", 2)[1])
            if status >= 200 or status == 101:
                break
        _, _, headers = _parse_head(head, response=True)
        await self.down.take(len(head))
        writer.write(head)
        no_body = method == "HEAD" or status in (204, 304)
        if no_body:
            await writer.drain()
        else:
            await _pump_body(up_r, writer, headers, self.down, self._count_down, until_close=True, cut=cut)
        conn = (_header(headers, "connection") or "").lower()
        return conn != "close" and (no_body or _header(headers, "content-length") is not None
                                    or "chunked" in (_header(headers, "transfer-encoding") or "").lower())

    async def _control(self, method: str, target: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        path = target[len(CONTROL_PREFIX):].split("?", 1)[0]
        try:
            if path == "/faults" and method in ("PUT", "POST"):
                self.set_faults(Faults.from_dict(json.loads(body or b"{}")))
                out, code = asdict(self.faults), 200
            elif path == "/faults" and method == "GET":
                out, code = asdict(self.faults), 200
            elif path == "/stats" and method == "GET":
                out, code = asdict(self.stats), 200
            else:
                out, code = {"error": f"no control endpoint {method} {path}"}, 404
        except (ValueError, TypeError) as e:
            out, code = {"error": str(e)}, 400
        _write_response(writer, code, "OK" if code == 200 else "Error", json.dumps(out).encode(),
                        content_type="application/json")
        await writer.drain()


# ---------------------------------------------------------------- HTTP bits
async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request/response line and headers (``None`` on a clean EOF)."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    except asyncio.LimitOverrunError:
        raise ValueError("HTTP head too large") from None


def _parse_head(head: bytes, *, response: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ", 2)
    if len(first) < 2:
        raise ValueError(f"bad HTTP line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip().lower(), v.strip()))
    return ("", "", headers) if response else (first[0], first[1], headers)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _drop_header(head: bytes, name: str) -> bytes:
    lines = head.split(b"\r\n")
    keep = [ln for ln in lines if not ln.lower().startswith(name.encode() + b":")]
    return b"\r\n".join(keep)


async def _pump_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                     headers: list[tuple[str, str]], throttle: _Throttle, count: Any,
                     *, until_close: bool = False, cut: int | None = None) -> None:
    """Copy a message body chunk by chunk (``writer`` ``None``: read and drop it); with
    ``cut``, raise :class:`_Cut` once that many bytes were sent."""
    sent = 0

    async def send(data: bytes) -> None:
        nonlocal sent
        if cut is not None and sent + len(data) >= cut:
            data = data[:cut - sent]
            if writer is not None and data:
                writer.write(data)
                await writer.drain()
            raise _Cut()
        sent += len(data)
        await throttle.take(len(data))
        count(len(data))
        if writer is not None:
            writer.write(data)
            await writer.drain()

    async def copy(left: int) -> None:
        while left:
            data = await reader.read(min(left, CHUNK))
            if not data:
                raise ConnectionError("body ended early")
            left -= len(data)
            await send(data)

    if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            await send(size_line)
            await copy(size)
            if size == 0:  # trailers, then the empty line
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    await send(line)
                await send(line)
                return
            await send(await reader.readexactly(2))
    length = _header(headers, "content-length")
    if length is None:
        if until_close:  # a response delimited by the connection's end
            while data := await reader.read(CHUNK):
                await send(data)
        elif writer is not None:
            await writer.drain()
        return
    await copy(int(length))
    if writer is not None and not int(length):
        await writer.drain()


async def _read_body_whole(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    """A small control request's body (``Content-Length`` only, at most 64 KiB)."""
    n = int(_header(headers, "content-length") or 0)
    if n > 1 << 16:
        raise ValueError("control body too large")
    return await reader.readexactly(n)


def _write_response(writer: asyncio.StreamWriter, code: int, reason: str, body: bytes, *, content_type: str) -> None:
    writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


async def serve(*, upstream: str, host: str, port: int, faults: Faults) -> None:
    """Run the proxy until SIGTERM/SIGINT."""
    proxy = ProxyServer(upstream=upstream)
    proxy.set_faults(faults)
    server = await asyncio.start_server(proxy.handle, host, port, limit=1 << 16)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fault-injecting S3 proxy (loopback only)")
    p.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1", "localhost"],
                   help="loopback only")
    p.add_argument("--faults", default="{}", help="initial faults as JSON")
    args = p.parse_args(argv)
    asyncio.run(serve(upstream=args.upstream, host=args.host, port=args.port,
                      faults=Faults.from_dict(json.loads(args.faults))))
    return 0


# ------------------------------------------------------------ the wrapper
class S3Proxy:
    """The proxy as a subprocess with a PID, driven from tests.

    Args:
        upstream: ``http://host:port`` of the S3 server.
        port: Port to listen on (default: a free one).
        log_path: File for the proxy's output (default: discarded).
    """

    def __init__(self, *, upstream: str, port: int | None = None, log_path: str | None = None) -> None:
        self.upstream = upstream
        self.port = port or 0
        self.log_path = log_path
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 20.0, **faults: Any) -> "S3Proxy":
        """Start the process and wait until its control endpoint answers."""
        from localcluster.s3 import free_port, spawn_until_ready

        self.port = self.port or free_port()
        argv = [sys.executable, "-m", "localcluster.s3proxy", "--upstream", self.upstream, "--port", str(self.port),
                "--faults", json.dumps(faults)]
        spawn_until_ready(argv, name="s3proxy", endpoint=self.endpoint, ready=lambda: self.stats() is not None,
                          timeout=timeout, log_path=self.log_path, on_start=self._started, on_timeout=self.stop)
        return self

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc, self.pid = proc, proc.pid

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(self.endpoint + CONTROL_PREFIX + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the faults (see :class:`Faults`); ``set_faults()`` clears them."""
        return self._call("PUT", "/faults", faults)

    def stats(self) -> dict[str, Any]:
        """Counters since start: requests, failed_503, failed_reset, failed_cut, bytes_up, bytes_down, by_method,
        in_flight, peak_in_flight."""
        return self._call("GET", "/stats")

    def stop(self) -> None:
        """SIGTERM the proxy by PID, SIGKILL it if it lingers."""
        proc, self._proc, self.pid = self._proc, None, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "S3Proxy":
        return self.start() if self.pid is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
