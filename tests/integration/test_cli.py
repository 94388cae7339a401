"""`chat-bridge serve` as a user runs it: a subprocess, real clients, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chatclient import ChatClient
from conftest import Mosquitto, free_port


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", "serve", *args]


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    """Reads the bridge's log until `text` appears; the rest is drained in the background."""
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if text in line:
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout) and proc.poll() is None, f"the bridge never logged {text!r}"


@contextmanager
def serving(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        serve_cmd(*args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def against(mosquitto: Mosquitto, tmp_path: Path) -> tuple[str, ...]:
    """Options for a bridge on the test's Mosquitto with a SQLite file in tmp_path."""
    return (
        "--broker-url",
        f"mqtt://127.0.0.1:{mosquitto.port}",
        "--database-url",
        f"sqlite:///{tmp_path}/db.sqlite3",
    )


def test_busy_port_fails_fast_and_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            serve_cmd("--listen", f"127.0.0.1:{port}"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,  # it exits on its own; a serve that started would be killed here
        )
    assert result.returncode == 2
    assert "already in use" in result.stderr
    assert "--listen" in result.stderr and "--broker-url" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "chat-bridge.sqlite3").exists()  # failed before touching anything


def test_every_taken_port_is_named_in_one_go(tmp_path: Path) -> None:
    """A newcomer whose Mosquitto holds 1883 and 9001 (and something else 8080) learns of all three
    at the first start, not one per attempt."""
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
            s.listen()
        mqtt, ws, http = (s.getsockname()[1] for s in socks)
        result = subprocess.run(
            [
                *serve_cmd("--listen", f"127.0.0.1:{mqtt}", "--ws-listen", f"127.0.0.1:{ws}"),
                "--http-listen",
                f"127.0.0.1:{http}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for s in socks:
            s.close()
    assert result.returncode == 2, result.stderr
    for port in (mqtt, ws, http):
        assert f"127.0.0.1:{port} is already in use" in result.stderr, result.stderr
    for option in ("--listen 127.0.0.1:1884", "--ws-listen off", "--http-listen off"):
        assert option in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "chat-bridge.sqlite3").exists()


def test_bad_options_are_reported_without_a_traceback(tmp_path: Path) -> None:
    cases = (
        ["--listen", "nonsense"],
        ["--broker-url", "http://x"],
        ["--topic-prefix", "a/#"],
        ["--presence", "sometimes"],
        ["--max-event-size", "1000"],
        ["--max-event-size", "lots"],
        ["--cost-limit", "-1"],
        ["--cost-burst", "many"],
    )
    # all at once: each start-up is mostly the bridge's imports, one after the other took 8 of them
    procs = [
        subprocess.Popen(
            serve_cmd(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in cases
    ]
    try:
        for args, proc in zip(cases, procs):
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, (args, stderr)
            assert "chat-bridge:" in stderr and "Traceback" not in stderr, stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_max_event_size_comes_from_the_option_or_the_environment() -> None:
    from bridge.cli import build_parser, settings_from
    from bridge.limits import DEFAULT_MAX_EVENT

    parse = build_parser().parse_args
    assert settings_from(parse(["serve"])).max_event == DEFAULT_MAX_EVENT == 96 * 1024
    assert settings_from(parse(["serve", "--max-event-size", "100000"])).max_event == 100_000
    os.environ["CHAT_BRIDGE_MAX_EVENT_SIZE"] = "120000"
    try:
        assert settings_from(build_parser().parse_args(["serve"])).max_event == 120_000
    finally:
        del os.environ["CHAT_BRIDGE_MAX_EVENT_SIZE"]


def test_serve_with_embedded_broker_and_sqlite_in_the_working_directory(tmp_path: Path) -> None:
    port = free_port()
    with serving(tmp_path, env={"CHAT_BRIDGE_LISTEN": f"127.0.0.1:{port}"}) as proc:
        wait_for_line(proc, "bridge online")
        alice = ChatClient("alice", "127.0.0.1", port).start()
        alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online", timeout=20)
        assert alice.connect_chat()["type"] == "connected"
        sent = alice.request("send-message", conversation_id="global", body="first")
        assert sent["data"]["message"]["seq"] == 1
        alice.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert (tmp_path / "chat-bridge.sqlite3").exists()

    # The data survives a restart.
    with serving(tmp_path, "--listen", f"127.0.0.1:{port}") as proc:
        wait_for_line(proc, "bridge online")
        bob = ChatClient("bob", "127.0.0.1", port).start()
        bob.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online", timeout=20)
        history = bob.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
        assert [m["body"] for m in history] == ["first"]
        bob.stop()


def test_serve_against_mosquitto_announces_epochs_and_goes_offline_on_sigterm(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    watcher = ChatClient("watcher", "127.0.0.1", mosquitto.port).start()
    epochs = []
    for _ in range(2):
        with serving(tmp_path, *against(mosquitto, tmp_path)) as proc:
            status = watcher.wait_retained(
                "chat/v1/bridge/status",
                lambda s: s["status"] == "online" and s["epoch"] not in epochs,
                timeout=20,
            )
            epochs.append(status["epoch"])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            watcher.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "offline", timeout=10)
    assert len(set(epochs)) == 2
    watcher.stop()


def test_bridge_killed_leaves_its_will_offline(mosquitto: Mosquitto, tmp_path: Path) -> None:
    watcher = ChatClient("watcher", "127.0.0.1", mosquitto.port).start()
    with serving(tmp_path, *against(mosquitto, tmp_path)) as proc:
        watcher.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online", timeout=20)
        proc.kill()
        watcher.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "offline", timeout=10)
    watcher.stop()
