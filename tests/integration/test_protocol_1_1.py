"""Protocol 1.1 end to end over MQTT: typing at QoS 0, receipts, edits, tombstones, reactions,
offline notifications, the since_rev catch-up and search; Mosquitto and the embedded broker,
SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as paho
from chatclient import ChatClient
from conftest import EmbeddedBroker, Mosquitto, running_bridge
from paho.mqtt.enums import CallbackAPIVersion


class Tap:
    """A raw subscriber that records what the broker delivers, with its QoS (the dev brokers have no ACL)."""

    def __init__(self, port: int, filters: list[str]) -> None:
        self.got: list[tuple[str, int, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="tap-test", protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.changed:
            self.got.append((msg.topic, msg.qos, orjson.loads(msg.payload)))
            self.changed.notify_all()

    def wait(self, match: Any, timeout: float = 10) -> tuple[str, int, dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: any(match(*g) for g in self.got), timeout), self.got[-5:]
            return next(g for g in self.got if match(*g))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def sequence(port: int) -> None:
    tap = Tap(
        port, ["chat/v1/users/alice/inbox", "chat/v1/notifications/+", "chat/v1/conversations/+/events"]
    )
    alice = ChatClient("alice", "127.0.0.1", port).start()
    bob = ChatClient("bob", "127.0.0.1", port).start()
    try:
        alice.connect_chat()
        bob.connect_chat()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        bob.next_of("conversation-created")

        # typing: QoS 0 to alice, no answer to bob
        bob.send("typing", conversation_id=cid, typing=True, request_id="t1")
        assert alice.next_of("typing")["data"] == {"conversation_id": cid, "user_id": "bob", "typing": True}
        topic, qos, _ = tap.wait(lambda t, q, e: e.get("type") == "typing")
        assert (topic, qos) == ("chat/v1/users/alice/inbox", 0)

        # a message, its receipt
        first = bob.request("send-message", conversation_id=cid, body="helo alice")["data"]["message"]
        assert alice.next_of("message-added")["data"]["message"] == first
        convs = {c["conversation_id"]: c for c in alice.request("get-conversations")["data"]["conversations"]}
        assert (convs[cid]["unread"], convs[cid]["read_seq"]) == (1, 0)
        receipt = alice.request("mark-read", conversation_id=cid, seq=first["seq"])
        assert receipt["data"] == {"conversation_id": cid, "user_id": "alice", "read_seq": 1}
        assert bob.next_of("read-marker")["data"] == receipt["data"]

        # edit, delete, react
        edited = bob.request("edit-message", message_id=first["message_id"], body="hello alice")["data"][
            "message"
        ]
        assert alice.next_of("message-edited")["data"]["message"] == edited and edited["edited_at"]
        second = bob.request("send-message", conversation_id=cid, body="secret plan")["data"]["message"]
        tomb = bob.request("delete-message", message_id=second["message_id"])["data"]["message"]
        assert (tomb["body"], tomb["seq"]) == ("", second["seq"]) and tomb["deleted_at"]
        assert alice.next_of("message-deleted")["data"]["message"] == tomb
        reacted = alice.request("react", message_id=first["message_id"], emoji="👍")["data"]
        assert reacted["message"]["reactions"] == {"👍": ["alice"]}
        assert bob.next_of("reaction-changed")["data"] == reacted
        seen_rev = reacted["message"]["rev"]
        assert bob.request("typing", conversation_id="global", typing=True)["data"]["code"] == "forbidden"

        # alice goes offline; bob writes; a notification for alice
        alice.stop()
        bob.next_of("user-disconnected")
        later = bob.request("send-message", conversation_id=cid, body="are you there?")["data"]["message"]
        topic, _, note = tap.wait(lambda t, q, e: e.get("type") == "notification")
        assert topic == "chat/v1/notifications/alice"
        assert note["data"] == {
            "user_id": "alice",
            "conversation_id": cid,
            "message_id": later["message_id"],
            "sender_id": "bob",
            "preview": "are you there?",
        }

        # alice comes back and catches up with one since_rev call
        alice = ChatClient("alice", "127.0.0.1", port).start()
        alice.connect_chat()
        caught = alice.request("get-messages", conversation_id=cid, since_rev=seen_rev)["data"]
        assert [m["message_id"] for m in caught["messages"]] == [later["message_id"]]
        everything = alice.request("get-messages", conversation_id=cid, since_rev=0)["data"]["messages"]
        assert [m["rev"] for m in everything] == sorted(m["rev"] for m in everything)

        # search: the edited message by its new words, never the tombstone
        found = alice.request("search-messages", query="HELLO")["data"]["messages"]
        assert [m["message_id"] for m in found] == [first["message_id"]]
        assert alice.request("search-messages", query="helo")["data"]["messages"] == []
        assert alice.request("search-messages", query="secret plan")["data"]["messages"] == []

        # the conversation topic saw the message changes, never typing or receipts
        time.sleep(0)  # (ordering is by the broker; the round trips above already waited)
        on_topic = [e["type"] for t, _, e in tap.got if t == f"chat/v1/conversations/{cid}/events"]
        assert {"message-edited", "message-deleted", "reaction-changed"} <= set(on_topic)
        assert "typing" not in on_topic and "read-marker" not in on_topic
        assert not [e for e in bob.seen if e.get("request_id") == "t1"], "a successful typing is unanswered"
    finally:
        tap.stop()
        alice.stop(clean=False)  # (this alice may be the one stopped above)
        if (sock := alice.client.socket()) is not None:
            sock.close()  # an open connection kept the embedded broker's shutdown waiting 5 s
        bob.stop()


def test_1_1_over_mosquitto(mosquitto: Mosquitto, database_url: str) -> None:
    with running_bridge(mosquitto.port, database_url):
        sequence(mosquitto.port)


def test_1_1_over_the_embedded_broker(embedded_broker: EmbeddedBroker, tmp_path: Any) -> None:
    with running_bridge(
        embedded_broker.port, f"sqlite:///{tmp_path / 'chat.sqlite3'}", publisher=embedded_broker.publisher()
    ):
        sequence(embedded_broker.port)
