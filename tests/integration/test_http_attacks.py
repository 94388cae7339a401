"""Attacks on the HTTP server (`--http-listen`) with raw sockets: a crowd of connections that never
finish their request (slow loris), requests trickled a byte at a time, responses never read, huge
headers. /healthz must keep answering the monitor, and the server must not grow with the crowd."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_cli import serving, wait_for_line

import bridge.http
from bridge.http import HttpServer
from bridge.metrics import Health, Metrics, Probe


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def request(
    port: int, path: str = "/healthz", *, source: str = "127.0.0.1", timeout: float = 10
) -> tuple[int, bytes]:
    """A GET as a monitor sends it (from `source`, a loopback address): (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """Whether the server closes (or resets) `conn` within `within` seconds."""
    conn.settimeout(within)
    try:
        while conn.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def open_crowd(
    port: int, count: int, start: bytes = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
) -> list[socket.socket]:
    crowd = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.suppress(OSError):  # the server may have let it go already
            conn.sendall(start)
        crowd.append(conn)
    return crowd


def test_a_crowd_of_unfinished_requests_neither_holds_threads_nor_starves_healthz(tmp_path: Path) -> None:
    """`chat-bridge serve` used to start a thread for each connection and keep it while the
    connection sent a byte now and then: 600 idle sockets were 600 threads."""
    http, mqtt, ws = free_port(), free_port(), free_port()
    args = ("--listen", f"127.0.0.1:{mqtt}", "--ws-listen", f"127.0.0.1:{ws}")
    args += ("--database-url", f"sqlite:///{tmp_path / 'db.sqlite3'}", "--http-listen", f"127.0.0.1:{http}")
    with serving(tmp_path, *args) as proc:
        wait_for_line(proc, "bridge online")
        deadline = time.monotonic() + 20
        while request(http)[0] != 200:
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.1)
        before = threads(proc.pid)
        crowd = open_crowd(http, 600)
        try:
            for source in ("127.0.0.1", "127.0.0.2"):  # the attacker's own address too
                for _ in range(3):
                    start = time.monotonic()
                    status, body = request(http, source=source)
                    assert status == 200 and json.loads(body)["status"] == "ok"
                    assert time.monotonic() - start < 3
            assert threads(proc.pid) <= before + 8, (before, threads(proc.pid))
        finally:
            for conn in crowd:
                conn.close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpServer]:
    # short deadlines for the test (raising=False: they exist on the server that enforces them)
    monkeypatch.setattr(bridge.http, "REQUEST_TIMEOUT", 1.5, raising=False)
    monkeypatch.setattr(bridge.http, "WRITE_TIMEOUT", 1.5, raising=False)
    health = Health(Metrics(), lambda: Probe(True, None, 0, 0), min_interval=0)
    health.broker_up()
    s = HttpServer("127.0.0.1", 0, health, Metrics())
    s.start()
    yield s
    s.stop()


def test_a_request_trickled_a_byte_at_a_time_is_cut_off(server: HttpServer) -> None:
    """Each byte came before the old per-read timeout: the connection was kept for ever."""
    conn = socket.create_connection(server.address, timeout=10)
    start = time.monotonic()
    cut = False
    for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200:
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            cut = True
            break
        conn.settimeout(0.2)
        try:
            if conn.recv(65536) == b"":
                cut = True
                break
        except TimeoutError:
            pass
        except ConnectionResetError:
            cut = True
            break
        if time.monotonic() - start > 8:
            break
    assert cut, "the trickled request was still open after 8 s"
    assert time.monotonic() - start < 5
    conn.close()


def test_an_idle_keep_alive_connection_is_closed(server: HttpServer) -> None:
    conn = socket.create_connection(server.address, timeout=10)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    assert closed_by_server(conn, within=5)
    conn.close()


def test_a_response_nobody_reads_does_not_hold_the_connection(server: HttpServer) -> None:
    """The page's script, asked for again and again on one connection whose reader never reads."""
    conn = socket.create_connection(server.address, timeout=10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.setblocking(False)
    start, sent = time.monotonic(), 0
    try:
        while time.monotonic() - start < 8:
            try:
                sent += conn.send(b"GET /app.js HTTP/1.1\r\nHost: localhost\r\n\r\n")
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                break
        else:
            raise AssertionError("still open after 8 s")
    finally:
        conn.close()
    assert time.monotonic() - start < 6


def test_huge_or_endless_headers_are_refused(server: HttpServer) -> None:
    conn = socket.create_connection(server.address, timeout=10)
    with contextlib.suppress(OSError):
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n")
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    conn.close()
    assert data == b"" or data.split()[1] in (b"400", b"431")
    for many in (b"X-B: b\r\n" * 5000,):
        conn = socket.create_connection(server.address, timeout=10)
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
            got = conn.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        conn.close()
        assert got == b"" or got.split()[1] in (b"400", b"431"), got[:100]
