"""The seed chat sequence end to end over MQTT: real brokers, real databases, paho clients."""

from __future__ import annotations

from typing import Any

from chatclient import ChatClient
from conftest import EmbeddedBroker, Mosquitto, running_bridge


def chat_sequence(port: int) -> None:
    alice = ChatClient("alice", "127.0.0.1", port).start()
    bob = ChatClient("bob", "127.0.0.1", port).start()
    try:
        status = alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online")
        assert status["epoch"]

        hello = alice.connect_chat(display_name="Alice")
        assert hello["type"] == "connected"
        assert hello["data"]["user"] == {"user_id": "alice", "display_name": "Alice", "active": True}
        assert [c["conversation_id"] for c in hello["data"]["conversations"]] == ["global"]
        assert alice.next_of("user-connected")["data"]["user"]["user_id"] == "alice"
        assert alice.wait_retained("chat/v1/presence/alice", lambda v: True)["status"] == "online"

        bob.connect_chat()
        seen = alice.next_of("user-connected")
        assert seen["data"]["user"]["user_id"] == "bob" and seen["request_id"] is None

        created = alice.request("create-conversation", kind="direct", participants=["bob"])
        assert created["type"] == "conversation-created"
        conv = created["data"]["conversation"]
        assert conv["kind"] == "direct" and conv["participants"] == ["alice", "bob"]
        cid = conv["conversation_id"]
        assert bob.next_of("conversation-created")["data"]["conversation"]["conversation_id"] == cid

        again = bob.request("create-conversation", kind="direct", participants=["alice"])
        assert again["data"]["conversation"]["conversation_id"] == cid

        sent = alice.request("send-message", conversation_id=cid, body="hi bob", client_msg_id="m1")
        msg = sent["data"]["message"]
        assert (msg["seq"], msg["sender_id"], msg["body"]) == (1, "alice", "hi bob")
        assert bob.next_of("message-added")["data"]["message"] == msg

        replay = alice.request("send-message", conversation_id=cid, body="hi bob", client_msg_id="m1")
        assert replay["data"]["message"] == msg

        bob.request("send-message", conversation_id=cid, body="hi alice")
        history = alice.request("get-messages", conversation_id=cid, since_seq=0)
        assert [m["body"] for m in history["data"]["messages"]] == ["hi bob", "hi alice"]
        assert history["data"]["has_more"] is False
        by_time = alice.request("get-messages", conversation_id=cid, since=msg["created_at"], limit=5)
        assert [m["seq"] for m in by_time["data"]["messages"]] == [2]

        convs = bob.request("get-conversations")["data"]["conversations"]
        assert [c["conversation_id"] for c in convs] == ["global", cid]
        assert convs[1]["last_seq"] == 2
        active = bob.request("get-active-users")["data"]["users"]
        assert [u["user_id"] for u in active] == ["alice", "bob"]

        error = bob.request("send-message", conversation_id="nope", body="x")
        assert error["type"] == "error" and error["data"]["code"] == "not-found"

        alice.stop()
        gone = bob.next_of("user-disconnected")
        assert gone["data"] == {"user_id": "alice"}
        assert bob.wait_retained("chat/v1/presence/alice", lambda v: v["status"] == "offline")
    finally:
        alice.stop(clean=False)
        bob.stop()


def test_sequence_over_mosquitto(mosquitto: Mosquitto, database_url: str) -> None:
    with running_bridge(mosquitto.port, database_url):
        chat_sequence(mosquitto.port)


def test_sequence_over_embedded_broker(embedded_broker: EmbeddedBroker, tmp_path: Any) -> None:
    with running_bridge(
        embedded_broker.port,
        f"sqlite:///{tmp_path / 'chat.sqlite3'}",
        publisher=embedded_broker.publisher(),
    ):
        chat_sequence(embedded_broker.port)


def test_retained_presence_mode_end_to_end(mosquitto: Any, tmp_path: Any) -> None:
    """`--presence retained`: others learn of alice from the retained presence topic, not their inbox."""
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path / 'chat.sqlite3'}", presence="retained"):
        bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
        assert bob.connect_chat()["data"]["active_users"] == []
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.connect_chat()
        bob.wait_retained("chat/v1/presence/alice", lambda s: s["status"] == "online")
        alice.stop()  # publishes its chat disconnect
        bob.wait_retained("chat/v1/presence/alice", lambda s: s["status"] == "offline")
        # a round trip: everything the bridge sent bob before this answer has arrived
        users = bob.request("get-active-users")["data"]["users"]
        assert [u["user_id"] for u in users] == ["bob"]
        assert [e["type"] for e in bob.seen] == []  # no user-connected / user-disconnected in his inbox
        bob.stop()
