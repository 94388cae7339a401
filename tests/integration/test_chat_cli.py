"""`chat-bridge chat` as a person uses it: two terminals (tmux) against a running bridge."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EmbeddedBroker, running_bridge

from chat_bridge.client import Client

pytestmark = pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")


class Terminal:
    def __init__(self, server: str, name: str, command: list[str]) -> None:
        self.tmux = ["tmux", "-L", server]
        self.name = name
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", name, "-x", "110", "-y", "40", *command], check=True
        )

    def screen(self) -> str:
        out = subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, check=False
        )
        return out.stdout

    def type(self, text: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, "-l", text], check=True)
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, "Enter"], check=True)

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: {text!r} never appeared; screen:\n{self.screen()}")


@pytest.fixture
def bridge_port(embedded_broker: EmbeddedBroker, tmp_path: Path) -> Iterator[int]:
    with running_bridge(embedded_broker.port, f"sqlite:///{tmp_path / 'chat.sqlite3'}"):
        yield embedded_broker.port


@pytest.fixture
def terminals(bridge_port: int) -> Iterator[dict[str, Terminal]]:
    server = f"chat-test-{uuid.uuid4().hex[:8]}"
    chat = [sys.executable, "-m", "bridge", "chat", "--port", str(bridge_port)]
    try:
        yield {user: Terminal(server, user, [*chat, user]) for user in ("alice", "bob")}
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], check=False, capture_output=True)


def test_two_people_chat_in_terminals(terminals: dict[str, Terminal], bridge_port: int) -> None:
    alice, bob = terminals["alice"], terminals["bob"]
    alice.wait_for("connected as alice")
    bob.wait_for("connected as bob")
    alice.type("hello everyone")
    bob.wait_for("alice: hello everyone")
    bob.type("/dm alice")
    bob.wait_for("[@alice] >")
    bob.type("hi alice, just us")
    alice.wait_for("[@bob] bob: hi alice, just us")  # elsewhere: shown with where it is
    alice.type("/list")
    alice.wait_for("1 unread")
    alice.type("/open @bob")
    alice.wait_for("[@bob] >")
    alice.type("hey bob")
    bob.wait_for("alice: hey bob")
    alice.type("/group team bob")
    alice.wait_for("[team] >")
    bob.wait_for("new conversation team (group)")
    with Client("carol", port=bridge_port) as carol:  # history: more than one screen's worth
        direct = carol.create_direct("alice")
        for n in range(1, 26):
            carol.send_message(direct["conversation_id"], f"old message {n}")
    alice.type("/open @carol")  # (carol's messages were also announced as they came: "[@carol] carol: ...")
    alice.wait_for("@carol: 20 latest messages")
    screen = alice.wait_for("#25 carol: old message 25")
    assert "#6 carol: old message 6" in screen and "#5 carol" not in screen
    alice.type("/history")
    alice.wait_for("5 older messages")
    alice.wait_for("#1 carol: old message 1")
    alice.type("/who")
    alice.wait_for("online: ")
    alice.type("/nonsense")
    alice.wait_for("unknown command")
    alice.type("/open nobody")
    alice.wait_for("no conversation 'nobody'")
    bob.type("/quit")
    alice.wait_for("bob went offline")
