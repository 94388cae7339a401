"""The runtime against real brokers: poison events, a lost subscription, the queued backlog, a
graceful stop, an unreachable broker, and throttled warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from chatclient import ChatClient
from conftest import ROOT, EmbeddedBroker, Mosquitto, mosquitto_available, running_bridge


@pytest.fixture
def small_mosquitto(tmp_path: Path) -> Mosquitto:
    """Mosquitto refusing packets over 8 KiB, as the shipped config does over 128 KiB."""
    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    broker = Mosquitto(tmp_path, extra=("max_packet_size 8192",)).start()
    yield broker  # type: ignore[misc]
    broker.stop()


def test_an_event_the_broker_disconnects_on_is_set_aside_and_the_rest_flows(
    small_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The event is bigger than the broker takes: it closes the bridge's connection whenever the bridge
    publishes it. It must not wedge the bridge: set aside, and everything after it delivered."""
    port = small_mosquitto.port
    alice = ChatClient("alice", "127.0.0.1", port).start()
    bob = ChatClient("bob", "127.0.0.1", port).start()
    with running_bridge(port, f"sqlite:///{tmp_path / 'c.sqlite3'}") as bridge:
        alice.connect_chat()
        bob.connect_chat()
        alice.send("send-message", conversation_id="global", body="x" * 7950, request_id="huge")
        alice.send("send-message", conversation_id="global", body="after", request_id="after")
        answer = alice.answer("after", timeout=30)
        assert answer["data"]["message"]["body"] == "after"
        assert bob.wait_for(lambda e: e.get("data", {}).get("message", {}).get("body") == "after", 10)
        assert bridge.status.events_set_aside >= 1  # type: ignore[attr-defined]
        # and the bridge keeps answering
        assert alice.request("get-active-users")["type"] == "active-users"
    alice.stop()
    bob.stop()


def test_a_subscription_the_broker_dropped_is_noticed_and_renewed(tmp_path: Path) -> None:
    """The broker silently forgets the bridge's subscription (as amqtt did when an unauthenticated
    CONNECT took the bridge's client id): the self-probe notices and the bridge subscribes again."""
    broker = EmbeddedBroker().start()
    try:
        alice = ChatClient("alice", "127.0.0.1", broker.port).start()
        with running_bridge(
            broker.port, f"sqlite:///{tmp_path / 'c.sqlite3'}", probe_interval=0.5, probe_timeout=1.0
        ):
            alice.connect_chat()
            subs = broker.broker._subscriptions  # type: ignore[attr-defined]
            for topic in list(subs):  # the bridge is the only one subscribed to command topics
                if "/commands/" in topic:
                    del subs[topic]
            deadline, answered = time.monotonic() + 20, False
            while not answered and time.monotonic() < deadline:
                rid = alice.send("get-active-users")
                try:
                    alice.answer(rid, timeout=1)
                    answered = True
                except TimeoutError:
                    pass
            assert answered, "the bridge never noticed that it lost its subscription"
        alice.stop()
    finally:
        broker.stop()


def test_the_shipped_acl_lets_the_probe_through(
    secure_mosquitto: tuple[Mosquitto, Path], tmp_path: Path
) -> None:
    broker, _ = secure_mosquitto
    with running_bridge(
        broker.port,
        f"sqlite:///{tmp_path / 'c.sqlite3'}",
        credentials="chat-bridge:bridge-pw",
        probe_interval=0.2,
        probe_timeout=1.0,
    ) as bridge:
        deadline = time.monotonic() + 10
        while bridge.status.probes_returned < 3 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert bridge.status.probes_returned >= 3  # type: ignore[attr-defined]
        assert bridge.status.probes_lost == 0  # type: ignore[attr-defined]


def test_the_queued_backlog_is_applied_not_rate_limited(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Commands published while the bridge was away, under the limit when sent, arrive all at once."""
    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    with running_bridge(mosquitto.port, db):
        pass  # the bridge's persistent session exists now
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    sent = [alice.send("get-active-users") for _ in range(60)]
    with running_bridge(mosquitto.port, db, rate_limit=5, rate_burst=10) as bridge:
        answers = [alice.answer(rid, timeout=15) for rid in sent]
        assert [a["type"] for a in answers] == ["active-users"] * 60
        assert bridge.status.queued_commands >= 60  # type: ignore[attr-defined]
        # afterwards the limit applies again
        live = [alice.send("get-active-users") for _ in range(30)]
        kinds = [alice.answer(rid, timeout=15)["type"] for rid in live]
        assert "error" in kinds
    alice.stop()


def test_a_graceful_stop_right_after_an_answer_leaves_no_outbox_rows(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Otherwise the next start publishes the answer again (same event_id)."""
    from sqlalchemy import func, select

    from bridge.sql import make_engine, outbox

    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    with running_bridge(mosquitto.port, db):
        alice.connect_chat()
        alice.request("get-active-users")
    engine = make_engine(db)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 0
    engine.dispose()
    with running_bridge(mosquitto.port, db), pytest.raises(TimeoutError):
        alice.next_of("active-users", timeout=1)
    alice.stop()


@pytest.mark.parametrize(
    ("url", "named", "error"),
    [
        ("mqtt://127.0.0.1:1", "127.0.0.1:1", "refused"),
        ("mqtt://no-such-broker.invalid:1883", "no-such-broker.invalid:1883", "resolve"),
    ],
)
def test_a_broker_that_cannot_be_reached_is_named_in_a_warning_at_once(
    tmp_path: Path, url: str, named: str, error: str
) -> None:
    env = {**os.environ, "CHAT_BRIDGE_HTTP_LISTEN": "off"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--broker-url",
            url,
            "--database-url",
            f"sqlite:///{tmp_path / 'c.sqlite3'}",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "WARNING" in line and named in line and error in line.lower():
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(15), "".join(lines)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_commands_on_invalid_user_ids_warn_once_not_per_message(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path / 'c.sqlite3'}"):
        alice.connect_chat()
        caplog.set_level(logging.WARNING)
        for _ in range(30):
            alice.client.publish("chat/v1/users/bad.id/commands/connect", b"{}", qos=1).wait_for_publish(5)
        alice.request("get-active-users")  # after the 30 in the bridge's one ordered stream
    warnings = [r for r in caplog.records if "bad.id" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    alice.stop()
