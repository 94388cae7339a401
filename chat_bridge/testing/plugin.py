"""The pytest plugin (entry point `pytest11`): a running bridge and SDK clients as fixtures.

    def test_hello(chat_client):
        alice, bob = chat_client("alice"), chat_client("bob")
        conv = alice.create_direct("bob")
        alice.send_message(conv["conversation_id"], "hi")
        assert bob.wait_for("message-added").message["body"] == "hi"

Options: `--chat-bridge-broker-url` (env CHAT_BRIDGE_TEST_BROKER_URL) runs the bridge against that
broker instead of its embedded one; `--chat-bridge-database-url` (env CHAT_BRIDGE_TEST_DATABASE_URL)
uses that database instead of a fresh SQLite file per test; `--chat-bridge-topic-prefix` (env
CHAT_BRIDGE_TEST_TOPIC_PREFIX) gives the bridge and its clients another prefix than chat/v1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..client import Client
from ._process import BridgeProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chat-bridge")
    group.addoption(
        "--chat-bridge-broker-url",
        default=os.environ.get("CHAT_BRIDGE_TEST_BROKER_URL"),
        help="run the chat_bridge_server fixture against this broker, mqtt://[user:password@]host:port "
        "[env CHAT_BRIDGE_TEST_BROKER_URL]",
    )
    group.addoption(
        "--chat-bridge-database-url",
        default=os.environ.get("CHAT_BRIDGE_TEST_DATABASE_URL"),
        help="the chat_bridge_server fixture's database (default: a new SQLite file per test) "
        "[env CHAT_BRIDGE_TEST_DATABASE_URL]",
    )
    group.addoption(
        "--chat-bridge-topic-prefix",
        default=os.environ.get("CHAT_BRIDGE_TEST_TOPIC_PREFIX", "chat/v1"),
        help="the chat_bridge_server fixture's topic prefix, e.g. to keep clear of another bridge on "
        "the same broker (default: chat/v1) [env CHAT_BRIDGE_TEST_TOPIC_PREFIX]",
    )


@pytest.fixture
def chat_bridge_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BridgeProcess]:
    """A running `chat-bridge serve` (embedded broker on a free port, fresh SQLite), stopped afterwards."""
    bridge = BridgeProcess(
        tmp_path / "chat-bridge",
        broker_url=request.config.getoption("--chat-bridge-broker-url"),
        database_url=request.config.getoption("--chat-bridge-database-url"),
        prefix=request.config.getoption("--chat-bridge-topic-prefix"),
    )
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()


@pytest.fixture
def chat_client(chat_bridge_server: BridgeProcess) -> Iterator[Callable[..., Client]]:
    """`chat_client("alice", **options)`: a connected SDK client of that bridge, closed after the test."""
    clients: list[Client] = []

    def make(user: str, *, connect: bool = True, **options: Any) -> Client:
        client = chat_bridge_server.client(user, **options)
        clients.append(client)
        if connect:
            client.connect()
        return client

    yield make
    for client in clients:
        client.close()
