"""The Python SDK against a real bridge: the embedded broker and Mosquitto."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from chatclient import ChatClient
from conftest import EmbeddedBroker, Mosquitto, running_bridge
from paho.mqtt.enums import CallbackAPIVersion
from tcpproxy import Proxy

from chat_bridge import errors
from chat_bridge.client import AsyncClient, Client
from chat_bridge.types import Message


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chat.sqlite3'}"


@pytest.fixture
def embedded_bridge(embedded_broker: EmbeddedBroker, tmp_path: Path) -> Iterator[int]:
    with running_bridge(embedded_broker.port, f"sqlite:///{tmp_path / 'chat.sqlite3'}"):
        yield embedded_broker.port


def test_two_users_chat_and_errors_are_exceptions(embedded_bridge: int) -> None:
    with Client("alice", port=embedded_bridge) as alice, Client("bob", port=embedded_bridge) as bob:
        conv = alice.create_direct("bob")
        assert bob.wait_for("conversation-created").conversation == conv
        sent = alice.send_message(conv["conversation_id"], "hi bob", client_msg_id="m1")
        got = bob.wait_for("message-added")
        assert got.message == sent and got.request_id is None
        assert alice.send_message(conv["conversation_id"], "hi bob", client_msg_id="m1") == sent
        assert [m["body"] for m in bob.get_messages(conv["conversation_id"])["messages"]] == ["hi bob"]
        with pytest.raises(errors.NotFound):
            alice.send_message("c_nothing_here", "hello?")
        with pytest.raises(errors.Forbidden):
            alice.leave(conv["conversation_id"])
        with pytest.raises(errors.BadRequest):
            alice.send_message(conv["conversation_id"], "")
        with pytest.raises(errors.NotFound):
            alice.create_direct("nobody-at-all")
        group = alice.create_group(["bob"], "team")
        thread_msg = bob.reply(bob.send_message(group["conversation_id"], "root")["message_id"], "in thread")
        assert thread_msg["conversation_id"] != group["conversation_id"]
        assert {u["user_id"] for u in alice.get_active_users()} >= {"alice", "bob"}


def test_reconnect_uses_a_new_session_and_a_will_that_names_it(mosquitto: Mosquitto, db: str) -> None:
    proxy = Proxy("127.0.0.1", mosquitto.port)
    with running_bridge(mosquitto.port, db), Client("bob", port=mosquitto.port) as bob:
        alice = Client("alice", port=proxy.port)
        alice.connect()
        first = alice.session_id
        bob.wait_for("user-connected", lambda e: e.data["user"]["user_id"] == "alice", timeout=1)
        proxy.cut()  # the broker publishes alice's will
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "alice")
        proxy.restore()  # paho reconnects; the SDK announces a new session
        bob.wait_for("user-connected", lambda e: e.data["user"]["user_id"] == "alice", timeout=15)
        second = alice.session_id
        assert second != first
        # the second will must name the second session, or the bridge would take it for a stale one
        proxy.cut()
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "alice")
        alice.close()
    proxy.close()


def test_a_restarted_bridge_gets_connect_again_and_keeps_the_session(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'chat.sqlite3'}"
    with running_bridge(mosquitto.port, db, session_grace=1):
        alice = Client("alice", port=mosquitto.port)
        alice.connect()
        bob = Client("bob", port=mosquitto.port)
        bob.connect()
        carol = ChatClient("carol", "127.0.0.1", mosquitto.port).start()  # never re-announces
        carol.connect_chat()
        epoch = alice.wait_for("bridge-status", lambda e: e.data.get("status") == "online").data["epoch"]
    with running_bridge(mosquitto.port, db, session_grace=1):
        alice.wait_for("bridge-status", lambda e: e.data.get("epoch") not in (None, epoch))
        again = alice.wait_for("connected")  # re-announced, with the same session
        assert again.data["session_id"] == alice.session_id
        # after the grace period the bridge ends the session nobody re-announced, and only that one
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "carol", timeout=15)
        active = {u["user_id"] for u in bob.get_active_users()}
        assert "alice" in active and "bob" in active and "carol" not in active
        alice.close()
        bob.close()
        carol.stop()


def test_timeouts(mosquitto: Mosquitto, db: str) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(errors.ConnectionFailed, match="cannot be reached"):
        Client("alice", port=closed_port).connect(timeout=2)
    nobody = Client("alice", port=mosquitto.port)
    with pytest.raises(errors.ConnectionFailed, match="no answer to connect"):
        nobody.connect(timeout=0.5)
    with running_bridge(mosquitto.port, db):
        alice = Client("alice", port=mosquitto.port)
        alice.connect()
    with pytest.raises(errors.RequestTimeout):  # the bridge is gone
        alice.get_conversations(timeout=0.5)
    alice.close()


def test_an_event_delivered_twice_is_seen_once(embedded_bridge: int) -> None:
    raw = paho.Client(CallbackAPIVersion.VERSION2, client_id="mallory:dup")
    raw.connect("127.0.0.1", embedded_bridge)
    raw.loop_start()
    with Client("alice", port=embedded_bridge) as alice, Client("bob", port=embedded_bridge) as bob:
        conv = bob.create_direct("alice")
        bob.send_message(conv["conversation_id"], "once")
        first = alice.wait_for("message-added")
        assert first.event_id
        duplicate = {
            "type": first.type,
            "request_id": None,
            "event_id": first.event_id,
            "ts": first.ts,
            "data": first.data,
        }
        raw.publish("chat/v1/users/alice/inbox", json.dumps(duplicate), qos=1).wait_for_publish(5)
        bob.send_message(conv["conversation_id"], "twice?")
        assert alice.wait_for("message-added").message["body"] == "twice?"  # type: ignore[index]
    raw.loop_stop()


def test_catch_up_after_a_reconnect(mosquitto: Mosquitto, db: str) -> None:
    proxy = Proxy("127.0.0.1", mosquitto.port)
    with running_bridge(mosquitto.port, db), Client("bob", port=mosquitto.port) as bob:
        alice = Client("alice", port=proxy.port)
        alice.connect()
        conv = bob.create_direct("alice")
        group = bob.create_group(["alice"], "before")
        alice.wait_for("conversation-created", lambda e: e.conversation_id == group["conversation_id"])
        bob.send_message(conv["conversation_id"], "seen live")
        alice.wait_for("message-added")
        proxy.cut()
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "alice")
        for n in range(3):
            bob.send_message(conv["conversation_id"], f"missed {n}")
        later = bob.create_group(["alice"], "while away")
        bob.send_message(later["conversation_id"], "in the new group")
        bob.remove_conversation(group["conversation_id"])
        proxy.restore()
        caught = [alice.wait_for(match=lambda e: e.catch_up, timeout=15) for _ in range(6)]
        bodies = [e.message["body"] for e in caught if e.type == "message-added" and e.message]
        assert sorted(bodies) == ["in the new group", "missed 0", "missed 1", "missed 2"]
        assert [e.conversation_id for e in caught if e.type == "conversation-created"] == [
            later["conversation_id"]
        ]
        assert [e.conversation_id for e in caught if e.type == "conversation-removed"] == [
            group["conversation_id"]
        ]
        assert not [e for e in alice.events(timeout=0.5) if e.catch_up]  # nothing twice
        alice.close()
    proxy.close()


def test_a_persistent_session_gets_queued_events_once(mosquitto: Mosquitto, db: str) -> None:
    proxy = Proxy("127.0.0.1", mosquitto.port)
    with running_bridge(mosquitto.port, db), Client("bob", port=mosquitto.port) as bob:
        alice = Client("alice", port=proxy.port, device="laptop")
        assert alice.client_id == "alice:laptop"
        alice.connect()
        conv = bob.create_direct("alice")
        alice.wait_for("conversation-created")
        proxy.cut()  # Mosquitto keeps the session and queues alice's events
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "alice")
        for n in range(3):
            bob.send_message(conv["conversation_id"], f"queued {n}")
        proxy.restore()
        got = [alice.wait_for("message-added", timeout=15) for _ in range(3)]
        assert sorted(e.message["body"] for e in got if e.message) == [f"queued {n}" for n in range(3)]
        # queued by the broker and fetched by catch-up, but each delivered once
        bob.wait_for("user-connected", lambda e: e.data["user"]["user_id"] == "alice")
        assert not [e for e in alice.events(timeout=1) if e.type == "message-added"]
        alice.close()
    proxy.close()


def test_the_async_client(embedded_bridge: int) -> None:
    async def main() -> None:
        async with (
            AsyncClient("alice", port=embedded_bridge) as alice,
            AsyncClient("bob", port=embedded_bridge) as bob,
        ):
            conv = await alice.create_direct("bob")
            await alice.send_message(conv["conversation_id"], "async hello")
            got = await bob.wait_for("message-added")
            assert got.message is not None and got.message["body"] == "async hello"
            with pytest.raises(errors.NotFound):
                await bob.get_participants("c_unknown")
            pages = await asyncio.gather(*(bob.get_messages(conv["conversation_id"]) for _ in range(5)))
            assert all(p["messages"][0]["body"] == "async hello" for p in pages)

    asyncio.run(main())


def skip_unless_1_1(message: Message) -> None:
    if "rev" not in message:
        pytest.skip("this bridge speaks protocol 1.0 (messages have no rev)")


def test_the_1_1_commands(embedded_bridge: int) -> None:
    with Client("alice", port=embedded_bridge) as alice, Client("bob", port=embedded_bridge) as bob:
        conv = alice.create_group(["bob"], "team")
        cid = conv["conversation_id"]
        first = alice.send_message(cid, "the quick brown fox")
        skip_unless_1_1(first)
        assert first["rev"] == 1 and first["reactions"] == {}
        marker = bob.mark_read(cid, first["seq"])
        assert marker == {"conversation_id": cid, "user_id": "bob", "read_seq": 1}
        assert alice.wait_for("read-marker").data["user_id"] == "bob"
        bob.typing(cid)
        assert alice.wait_for("typing").data == {"conversation_id": cid, "user_id": "bob", "typing": True}
        bob.typing("global")  # refused; typing waits for no answer, so the error comes as an event
        refusal = bob.wait_for("error")
        assert (refusal.data["code"], refusal.data["command"]) == ("forbidden", "typing")
        edited = alice.edit_message(first["message_id"], "the quick red fox")
        assert edited["edited_at"] and edited["rev"] == 2
        assert bob.wait_for("message-edited").message == edited
        with pytest.raises(errors.Forbidden):
            bob.edit_message(first["message_id"], "not mine")
        change = bob.react(first["message_id"], "👍")
        assert change["on"] and change["message"]["reactions"] == {"👍": ["bob"]}
        found = bob.search_messages("red fox")
        assert [m["message_id"] for m in found["messages"]] == [first["message_id"]] and found[
            "query"
        ] == "red fox"
        gone = alice.delete_message(first["message_id"])
        assert gone["deleted_at"] and gone["body"] == ""
        with pytest.raises(errors.NotFound):
            alice.edit_message(first["message_id"], "back?")
        assert bob.search_messages("fox")["messages"] == []


def test_catch_up_by_since_rev_sees_edits_deletions_and_reactions(mosquitto: Mosquitto, db: str) -> None:
    proxy = Proxy("127.0.0.1", mosquitto.port)
    with running_bridge(mosquitto.port, db), Client("bob", port=mosquitto.port) as bob:
        alice = Client("alice", port=proxy.port)
        alice.connect()
        conv = bob.create_group(["alice"], "revs")
        cid = conv["conversation_id"]
        alice.wait_for("conversation-created", lambda e: e.conversation_id == cid)
        kept, edited, deleted, reacted = (bob.send_message(cid, f"message {n}") for n in range(4))
        skip_unless_1_1(kept)
        alice.wait_for("message-added", lambda e: e.message is not None and e.message["seq"] == 4)
        assert alice.cursors[cid].rev == 4
        proxy.cut()
        bob.wait_for("user-disconnected", lambda e: e.data["user_id"] == "alice")
        bob.edit_message(edited["message_id"], "message 1, edited")
        bob.delete_message(deleted["message_id"])
        bob.react(reacted["message_id"], "🎉")
        new = bob.send_message(cid, "message 4")
        proxy.restore()
        caught = [alice.wait_for(match=lambda e: e.catch_up, timeout=15) for _ in range(4)]
        by_id = {e.message["message_id"]: e for e in caught if e.message}
        assert by_id[edited["message_id"]].type == "message-updated"
        assert by_id[edited["message_id"]].message["body"] == "message 1, edited"  # type: ignore[index]
        assert by_id[deleted["message_id"]].message["deleted_at"]  # type: ignore[index]
        assert by_id[reacted["message_id"]].message["reactions"] == {"🎉": ["bob"]}  # type: ignore[index]
        assert by_id[new["message_id"]].type == "message-added"
        assert kept["message_id"] not in by_id
        assert alice.cursors[cid].rev == 8 and alice.cursors[cid].seq == 5
        alice.close()
    proxy.close()


def test_a_client_moves_to_the_next_broker_of_its_cluster(embedded_bridge: int) -> None:
    # the node it is on dies (a proxy cut for good) and, at first, the first address answers nothing
    node = Proxy("127.0.0.1", embedded_bridge)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = s.getsockname()[1]  # (bound, not listening: connections are refused)
        also = [f"127.0.0.1:{embedded_bridge}"]
        with Client("bob", port=embedded_bridge) as bob:
            with Client("carol", port=nothing, fallbacks=also, timeout=20) as carol:
                assert carol.session_id
            alice = Client("alice", port=node.port, fallbacks=also)
            alice.connect()
            conv = alice.create_direct("bob")
            alice.send_message(conv["conversation_id"], "before", client_msg_id="m1")
            assert bob.wait_for("message-added").message["body"] == "before"
            node.close()  # gone: alice's library tries the next address
            alice.wait_for("connection-lost")
            alice.wait_for("connected", timeout=20)
            alice.send_message(conv["conversation_id"], "after", client_msg_id="m2", timeout=20)
            assert bob.wait_for("message-added", lambda e: e.message["body"] == "after").message
            alice.close()
    with pytest.raises(ValueError, match="host:port"):
        Client("alice", fallbacks=["no-port"])
