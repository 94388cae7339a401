"""The SDK's documented examples run as written."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, EmbeddedBroker, running_bridge

from chat_bridge import NotFound
from chat_bridge.client import Client

DOCS = ROOT / "docs" / "sdk-python.md"


def block_after(marker: str) -> str:
    text = DOCS.read_text()
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {marker} in {DOCS}"
    return match.group(1)


def test_the_bot_example_is_examples_echo_bot_and_ten_lines() -> None:
    code = block_after("<!-- bot example -->")
    assert code == (ROOT / "examples" / "echo_bot.py").read_text()
    assert len([line for line in code.splitlines() if line.strip()]) == 10


@pytest.fixture
def bridge_port(embedded_broker: EmbeddedBroker, tmp_path: Path) -> Iterator[int]:
    with running_bridge(embedded_broker.port, f"sqlite:///{tmp_path / 'chat.sqlite3'}"):
        yield embedded_broker.port


def test_the_bot_example_answers(bridge_port: int) -> None:
    bot = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "echo_bot.py"), str(bridge_port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Client("alice", port=bridge_port) as alice:
            deadline = time.monotonic() + 20
            while "echo-bot" not in {u["user_id"] for u in alice.get_active_users()}:
                assert time.monotonic() < deadline and bot.poll() is None, "the bot did not come online"
                with contextlib.suppress(TimeoutError):
                    alice.wait_for("user-connected", timeout=0.5)
            conv = alice.create_direct("echo-bot")
            alice.send_message(conv["conversation_id"], "ping")
            echoed = alice.wait_for("message-added", lambda e: e.message["sender_id"] == "echo-bot")  # type: ignore[index]
            assert echoed.message is not None and echoed.message["body"] == "echo: ping"
            alice.send_message("global", "hello bots")
            echoed = alice.wait_for("message-added", lambda e: e.message["sender_id"] == "echo-bot")  # type: ignore[index]
            assert echoed.message is not None and echoed.message["body"] == "echo: hello bots"
            with pytest.raises(NotFound):
                alice.get_messages("c_not_a_conversation")
    finally:
        bot.terminate()
        _, err = bot.communicate(timeout=10)
    assert "Traceback" not in err, err
