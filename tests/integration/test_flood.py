"""One user flooding is rate-limited; another user's messages still arrive."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson
import pytest
from chatclient import ChatClient
from conftest import EmbeddedBroker, Mosquitto, flood_guard, mosquitto_available, running_bridge


def test_flooder_is_limited_while_others_chat(mosquitto: Mosquitto, tmp_path: object) -> None:
    flood, rate, burst = 600, 20.0, 50
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path}/c.sqlite3", rate_limit=rate, rate_burst=burst):
        mallory = ChatClient("mallory", "127.0.0.1", mosquitto.port).start()
        bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        for c in (mallory, bob, alice):
            c.connect_chat()
        cid = bob.request("create-conversation", kind="direct", participants=["alice"])["data"][
            "conversation"
        ]["conversation_id"]
        started = time.monotonic()
        for i in range(flood):
            mallory.client.publish(
                mallory.topic("send-message"),
                orjson.dumps({"conversation_id": "global", "body": f"spam {i}", "request_id": f"s{i}"}),
                qos=1,
            )
            if i % 30 == 0:
                bob.send("send-message", conversation_id=cid, body=f"during flood {i}", request_id=f"b{i}")
        for i in range(0, flood, 30):
            assert bob.answer(f"b{i}", timeout=30)["type"] == "message-added"
        got = [
            alice.wait_for(
                lambda e: e["type"] == "message-added" and e["data"]["message"]["sender_id"] == "bob",
                timeout=30,
            )["data"]["message"]["body"]
            for _ in range(0, flood, 30)
        ]
        assert got == [f"during flood {i}" for i in range(0, flood, 30)]
        # every command gets exactly one answer: wait for all of them (refusals are published after
        # the answers of their batch's admitted commands, so they may come in any order)
        answers = {}
        deadline = time.monotonic() + 30
        while len(answers) < flood and time.monotonic() < deadline:
            e = mallory.wait_for(lambda e: (e.get("request_id") or "").startswith("s"), timeout=30)
            answers[e["request_id"]] = e
        elapsed = time.monotonic() - started
        admitted = [a for a in answers.values() if a["type"] == "message-added"]
        limited = [a for a in answers.values() if a["type"] == "error"]
        assert limited and all(
            a["data"]["code"] == "rate-limited" and a["data"]["retry_after"] > 0 for a in limited
        )
        # every command gets exactly one answer: admitted or refused, none dropped
        assert len(admitted) + len(limited) == flood
        assert len(admitted) <= burst + rate * elapsed + 1
        stored = alice.request("get-messages", conversation_id="global", since_seq=0, limit=500)["data"][
            "messages"
        ]
        assert sorted(m["body"] for m in stored) == sorted(f"spam {a['request_id'][1:]}" for a in admitted)
        for c in (bob, alice):
            c.stop()
        mallory.stop(clean=False)


def test_garbage_on_every_command_topic_never_stops_the_bridge(
    mosquitto: Mosquitto, tmp_path: object
) -> None:
    import random

    from bridge.protocol import COMMANDS

    rng = random.Random(1)
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path}/c.sqlite3"):
        mallory = ChatClient("mallory", "127.0.0.1", mosquitto.port).start()
        sent = 0
        for name in [*COMMANDS, "no-such-command", "x" * 300]:
            for _ in range(20):
                junk = rng.choice(
                    [
                        rng.randbytes(rng.randrange(0, 200)),
                        b"{" * 1000,
                        b"[]",
                        b"null",
                        b'{"request_id": {"a": 1}}',
                        b'{"body": "' + b"x" * 70_000 + b'"}',
                    ]
                )
                mallory.client.publish(mallory.topic(name), junk, qos=1)
                sent += 1
        errors = [
            mallory.next_of("error", timeout=30) for _ in range(sent - 20)
        ]  # disconnect junk may be silent
        assert {e["data"]["code"] for e in errors} <= {
            "bad-request",
            "unknown-command",
            "payload-too-large",
            "not-found",
        }
        assert mallory.connect_chat()["type"] == "connected"  # still serving
        mallory.stop()


def _flood_through_the_guard(port: int, db: str, rate: int, burst: int, publisher: object = None) -> None:
    """Mallory floods from two connections through a broker whose flood guard allows `rate`/s in
    bursts of `burst` per user: at most that reaches the bridge, bob is served, and mallory's last
    will still goes through."""
    flood = 300
    # the bridge's own limit off: every command that reaches it is applied
    with running_bridge(port, db, publisher=publisher):
        mallory = ChatClient("mallory", "127.0.0.1", port).start()
        mallory2 = ChatClient("mallory", "127.0.0.1", port).start()  # a second connection buys nothing
        bob = ChatClient("bob", "127.0.0.1", port).start()
        mallory.connect_chat()  # one of mallory's `burst`
        bob.connect_chat()
        started = time.monotonic()
        infos = [
            (mallory, mallory2)[i % 2].client.publish(
                mallory.topic("send-message"),
                orjson.dumps({"conversation_id": "global", "body": f"spam {i}", "request_id": f"s{i}"}),
                qos=1,
            )
            for i in range(flood)
        ]
        for info in infos:
            info.wait_for_publish(30)  # the broker acknowledges what it drops, too
        elapsed = time.monotonic() - started
        # bob's command comes after the whole flood in the bridge's one ordered stream
        stored = bob.request("get-messages", conversation_id="global", since_seq=0, limit=500)["data"][
            "messages"
        ]
        spam = [m for m in stored if m["sender_id"] == "mallory"]
        assert burst - 1 <= len(spam) <= burst + rate * elapsed + 1
        assert len(spam) < flood
        # mallory's bucket is empty; her connection drops: the broker's last will still goes through
        mallory.client.loop_stop()
        sock = mallory.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        mallory2.stop()  # her second connection leaves cleanly: no will
        offline = bob.wait_retained("chat/v1/presence/mallory", lambda v: v["status"] == "offline")
        assert offline["user_id"] == "mallory"
        bob.stop()


def test_mosquittos_flood_guard_drops_a_flood_in_the_broker_but_never_a_will(tmp_path: Path) -> None:
    """mosquitto/plugins/flood_guard.c, as the shipped mosquitto.conf loads it (with a lower rate)."""
    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    rate, burst = 5, 20
    guard = (f"plugin {flood_guard()}", f"plugin_opt_rate {rate}", f"plugin_opt_burst {burst}")
    broker = Mosquitto(tmp_path, extra=guard).start()
    try:
        _flood_through_the_guard(broker.port, f"sqlite:///{tmp_path}/c.sqlite3", rate, burst)
        assert any("chat flood guard: dropping commands from" in line for line in broker.log)
    finally:
        broker.stop()


def test_the_embedded_brokers_flood_guard_drops_a_flood_but_never_a_will(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rate, burst = 5, 20
    broker = EmbeddedBroker(guard=(rate, burst)).start()
    try:
        _flood_through_the_guard(
            broker.port, f"sqlite:///{tmp_path}/c.sqlite3", rate, burst, publisher=broker.publisher()
        )
    finally:
        broker.stop()
    assert sum("flood guard: dropping commands from mallory" in r.message for r in caplog.records) == 1


def test_the_embedded_guard_stays_above_the_bridges_own_limit() -> None:
    from bridge.broker import flood_guard_for

    assert flood_guard_for(50, 200) == (100.0, 300)  # the defaults: as Mosquitto's shipped config
    assert flood_guard_for(500, 1000) == (1000.0, 1500)
    assert flood_guard_for(0, 200) is None  # the bridge's limit off: no guard either
