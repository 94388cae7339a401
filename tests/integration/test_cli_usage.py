"""The command line as an operator meets it: --version, --help, mistakes, and what the log says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from chatclient import ChatClient
from conftest import ROOT, Mosquitto, free_port
from test_cli import serve_cmd, serving


class Log:
    """Every line the bridge logs, kept, to wait on one after another."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 30) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((line for line in self.lines if text in line), None), timeout
            )
        assert found, f"the bridge never logged {text!r}: {''.join(self.lines)}"
        return found


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_version_and_help_with_defaults(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0 and re.fullmatch(r"chat-bridge \S+ \(protocol 1\.1\)\n", result.stdout)
    text = "".join(run("serve", "--help", cwd=tmp_path).stdout.split())  # argparse wraps lines
    for default in (
        "default 127.0.0.1:1883",
        "default sqlite:///chat-bridge.sqlite3",
        "default chat/v1",
        "default 127.0.0.1:8080",
        "default 30",
        "env CHAT_BRIDGE_HTTP_LISTEN",
    ):
        assert default.replace(" ", "") in text, default


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["serve", "--bogus"], "usage: chat-bridge serve"),
        (["users", "add", "--bogus", "x"], "usage: chat-bridge users add"),
        (["users", "list", "--bogus"], "usage: chat-bridge users list"),
    ],
)
def test_an_unknown_option_shows_the_usage_of_its_subcommand(
    args: list[str], usage: str, tmp_path: Path
) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(usage) and "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+psycopg://chat:secret@127.0.0.1:1/chat", "Connection refused"),
        ("postgresql+psycopg://chat@nonexistent.invalid/chat", "nonexistent.invalid"),
        ("foo://bar", "'foo' is no database kind we know"),
        ("nonsense", "must be a SQLAlchemy URL"),
        ("sqlite:////nonexistent/dir/chat.sqlite3", "the directory /nonexistent/dir does not exist"),
    ],
)
@pytest.mark.parametrize("broker", ["embedded", "external"])
def test_a_bad_database_url_is_one_line_and_exit_code_2(
    url: str, says: str, broker: str, tmp_path: Path
) -> None:
    where = ["--listen", f"127.0.0.1:{free_port()}"]
    if broker == "external":
        where = ["--broker-url", f"mqtt://127.0.0.1:{free_port()}"]
    result = subprocess.run(
        serve_cmd("--database-url", url, *where), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("chat-bridge: --database-url") and says in lines[0]
    assert "secret" not in lines[0]


def test_the_log_says_who_connects_and_sums_up_the_traffic(mosquitto: Mosquitto, tmp_path: Path) -> None:
    args = (
        "--broker-url",
        f"mqtt://127.0.0.1:{mosquitto.port}",
        "--database-url",
        f"sqlite:///{tmp_path}/db",
    )
    with serving(tmp_path, *args, "--log-summary", "1") as proc:
        log = Log(proc)
        log.wait_for("bridge online")
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online")
        alice.connect_chat()
        assert " INFO " in log.wait_for(f"alice connected (session {alice.session_id})")
        alice.request("send-message", conversation_id="global", body="hi")
        summary = log.wait_for("commands (")
        assert " INFO " in summary and "2 commands" in summary and "1 sessions active" in summary, summary
        alice.stop()
        log.wait_for(f"alice disconnected (session {alice.session_id}, client)")


def test_the_suite_leaves_no_mosquitto_db_behind(tmp_path: Path) -> None:
    """Mosquitto started by the tests with persistence keeps its file in the test's directory."""
    data = tmp_path / "data"
    data.mkdir()
    broker = Mosquitto(tmp_path, replace={"persistence": "true", "persistence_location": f"{data}/"})
    conf = broker.conf.read_text()
    assert f"persistence_location {data}/" in conf
    before = (ROOT / "mosquitto.db").exists()
    broker.start()
    try:
        ChatClient("alice", "127.0.0.1", broker.port, client_id="alice:t", clean_session=False).start().stop()
    finally:
        broker.stop()
    assert (data / "mosquitto.db").exists()
    assert (ROOT / "mosquitto.db").exists() == before
    assert os.environ["CHAT_BRIDGE_HTTP_LISTEN"] == "off"  # set by conftest for every bridge started
