"""One user flooding is rate-limited; another user's messages still arrive."""

from __future__ import annotations

import orjson
from chatclient import ChatClient
from conftest import Mosquitto, running_bridge


def test_flooder_is_limited_while_others_chat(mosquitto: Mosquitto, tmp_path: object) -> None:
    flood = 600
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path}/c.sqlite3", rate_limit=20.0, rate_burst=50):
        mallory = ChatClient("mallory", "127.0.0.1", mosquitto.port).start()
        bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        for c in (mallory, bob, alice):
            c.connect_chat()
        cid = bob.request("create-conversation", kind="direct", participants=["alice"])["data"][
            "conversation"
        ]["conversation_id"]
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
        answers = [mallory.answer(f"s{i}", timeout=30) for i in range(flood)]
        limited = [a for a in answers if a["type"] == "error"]
        assert limited and all(
            a["data"]["code"] == "rate-limited" and a["data"]["retry_after"] > 0 for a in limited
        )
        stored = alice.request("get-messages", conversation_id="global", since_seq=0, limit=500)["data"][
            "messages"
        ]
        assert len(stored) == flood - len(limited) < flood
        for c in (mallory, bob, alice):
            c.stop()


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
