"""`--http-listen`: /healthz and /metrics of a running `chat-bridge serve`, scraped as Prometheus and
a load balancer would, with its broker and its database taken away and given back."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chatclient import ChatClient
from conftest import Mosquitto, free_port, scratch_postgres
from sqlalchemy.engine import make_url
from tcpproxy import Proxy
from test_cli import serve_cmd, serving, wait_for_line


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, kind, body = get(f"http://127.0.0.1:{port}/healthz")
    assert kind == "application/json"
    return status, json.loads(body)


def until(check: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            have = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
            if have == wanted:
                return float(match.group(3))
    return 0.0


def scrape(port: int) -> str:
    status, kind, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    return body


def test_healthz_and_metrics_follow_the_broker_and_the_sqlite_file(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    http = free_port()
    db = tmp_path / "db.sqlite3"
    args = ("--broker-url", f"mqtt://127.0.0.1:{mosquitto.port}", "--database-url", f"sqlite:///{db}")
    with serving(tmp_path, *args, "--http-listen", f"127.0.0.1:{http}") as proc:
        wait_for_line(proc, "bridge online")
        until(lambda: health(http)[0] == 200, what="healthy")
        _, body = health(http)
        assert body["status"] == "ok" and body["broker"]["connected"] and body["database"]["reachable"]
        assert body["epoch"].startswith("e_") and body["outbox_backlog"] == 0

        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online")
        alice.connect_chat()
        alice.request("send-message", conversation_id="global", body="hi")
        assert (
            alice.request("get-messages", conversation_id="nope", since_seq=0)["data"]["code"] == "not-found"
        )
        alice.publish_raw("no-such-command", b"{}")
        alice.next_of("error")

        def counted() -> bool:
            m = scrape(http)
            return sample(m, "chat_bridge_commands_total", command="unknown", outcome="unknown-command") == 1

        until(counted, what="the unknown command counted")
        metrics = scrape(http)
        assert sample(metrics, "chat_bridge_commands_total", command="connect", outcome="ok") == 1
        assert sample(metrics, "chat_bridge_commands_total", command="send-message", outcome="ok") == 1
        assert sample(metrics, "chat_bridge_commands_total", command="get-messages", outcome="not-found") == 1
        assert sample(metrics, "chat_bridge_command_duration_seconds_count", command="send-message") == 1
        assert sample(metrics, "chat_bridge_events_published_total", kind="inbox") >= 4
        assert sample(metrics, "chat_bridge_events_published_total", kind="conversation") == 1
        # (read from the database, by a probe at most once a second)
        until(lambda: sample(scrape(http), "chat_bridge_sessions_active") == 1, what="one session active")
        assert sample(metrics, "chat_bridge_broker_connected") == 1
        assert "chat_bridge_rate_limited_total" in metrics and "chat_bridge_database_retries_total" in metrics
        alice.stop()

        # The broker goes away: 503 naming it; it comes back: 200, one reconnect counted.
        mosquitto.stop()
        until(lambda: health(http)[0] == 503, what="503 without the broker")
        _, body = health(http)
        assert body["status"] == "unavailable" and not body["broker"]["connected"] and body["broker"]["error"]
        assert body["database"]["reachable"]
        mosquitto.start()
        until(lambda: health(http)[0] == 200, timeout=30, what="200 with the broker back")
        assert sample(scrape(http), "chat_bridge_broker_reconnects_total") == 1

        # The SQLite file is deleted under the running bridge: 503 naming it, not recreated.
        db.rename(tmp_path / "moved.sqlite3")
        until(lambda: health(http)[0] == 503, what="503 without the database file")
        _status, body = health(http)
        assert not body["database"]["reachable"] and str(db) in body["database"]["error"]
        assert body["broker"]["connected"] and not db.exists()
        (tmp_path / "moved.sqlite3").rename(db)
        until(lambda: health(http)[0] == 200, what="200 with the file back")
        assert sample(scrape(http), "chat_bridge_database_up") == 1


@pytest.mark.postgres
def test_healthz_says_503_while_postgres_is_unreachable(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with scratch_postgres() as url:
        real = make_url(url)
        proxy = Proxy(real.host or "127.0.0.1", real.port or 5432)
        via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
        http = free_port()
        args = ("--broker-url", f"mqtt://127.0.0.1:{mosquitto.port}", "--database-url", via_proxy)
        with serving(tmp_path, *args, "--http-listen", f"127.0.0.1:{http}") as proc:
            wait_for_line(proc, "bridge online")
            until(lambda: health(http)[0] == 200, what="healthy")
            proxy.cut()
            until(lambda: health(http)[0] == 503, what="503 without PostgreSQL")
            body = health(http)[1]
            assert not body["database"]["reachable"] and body["database"]["error"]
            assert body["broker"]["connected"]
            proxy.restore()
            until(lambda: health(http)[0] == 200, what="200 with PostgreSQL back")
        proxy.close()


def test_static_files_at_the_root_and_nothing_outside_them(tmp_path: Path) -> None:
    http, mqtt = free_port(), free_port()
    env = {"CHAT_BRIDGE_HTTP_LISTEN": f"127.0.0.1:{http}"}
    with serving(tmp_path, "--listen", f"127.0.0.1:{mqtt}", env=env) as proc:
        wait_for_line(proc, "bridge online")
        status, kind, body = get(f"http://127.0.0.1:{http}/")
        assert status == 200 and kind == "text/html; charset=utf-8" and "chat-bridge" in body
        for path in ("/../metrics.py", "/%2e%2e/metrics.py", "/..%2fcli.py", "/nothing-here", "/web"):
            with socket.create_connection(("127.0.0.1", http)) as raw:  # as sent, not normalized
                raw.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                answer = raw.makefile("rb").readline()
            assert answer.split()[1] == b"404", path


def test_http_listen_off_and_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            serve_cmd("--listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{port}"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "CHAT_BRIDGE_HTTP_LISTEN": "off"},
        )
    assert result.returncode == 2
    assert "--http-listen" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "chat-bridge.sqlite3").exists()  # failed before touching anything

    result = subprocess.run(
        serve_cmd("--http-listen", "localhost"), cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "--http-listen takes host:port" in result.stderr

    http, mqtt = free_port(), free_port()
    with serving(tmp_path, "--listen", f"127.0.0.1:{mqtt}", "--http-listen", "off") as proc:
        wait_for_line(proc, "bridge online")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", http), timeout=2).close()
