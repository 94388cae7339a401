"""Impersonation, eavesdropping, forged wills and bad credentials, against Mosquitto with the shipped
config and against the embedded broker with --password-file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from chatclient import ChatClient
from conftest import ACCOUNTS, EmbeddedBroker, running_bridge, write_accounts
from paho.mqtt.enums import CallbackAPIVersion


@contextmanager
def secured(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """A broker that requires accounts, and the bridge on it under its own account; yields the port."""
    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    if kind == "mosquitto":
        broker, _ = request.getfixturevalue("secure_mosquitto")
        with running_bridge(broker.port, db, credentials=f"chat-bridge:{ACCOUNTS['chat-bridge']}"):
            yield broker.port
        return
    from bridge.broker import Security

    embedded = EmbeddedBroker(Security(write_accounts(tmp_path / "passwd"), "internal-secret")).start()
    try:
        with running_bridge(
            embedded.port, db, credentials="chat-bridge:internal-secret", publisher=embedded.publisher()
        ):
            yield embedded.port
    finally:
        embedded.stop()


def user(name: str, port: int, **kw: Any) -> ChatClient:
    return ChatClient(name, "127.0.0.1", port, username=name, password=ACCOUNTS.get(name, "x"), **kw).start()


class Spy:
    """A raw paho client that subscribes to whatever it likes and records every message."""

    def __init__(self, name: str, port: int, filters: list[str], password: str | None = None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}:spy-{id(self)}")
        self.client.username_pw_set(name, password or ACCOUNTS[name])
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        subscribed = threading.Event()

        def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
            self.granted = [c.value for c in codes]
            subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


KINDS = ["mosquitto", "embedded"]


def connect_result(
    port: int, username: str | None, password: str | None, client_id: str | None = None, **kw: Any
) -> Any:
    """The CONNACK reason code, or None when the broker closed the connection without one."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=(username or "") if client_id is None else client_id, **kw
    )
    if username:
        client.username_pw_set(username, password)
    results: list[Any] = []
    done = threading.Event()
    client.on_connect = lambda _c, _u, _f, rc, _p: (results.append(rc), done.set())
    client.on_disconnect = lambda *a: done.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(10)
    client.loop_stop()
    return results[0] if results else None


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_password_and_anonymous_are_refused(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with secured(kind, request, tmp_path) as port:
        for username, password in (("alice", "wrong"), ("nobody", "x"), (None, None)):
            result = connect_result(port, username, password)
            assert result is None or result.is_failure, (username, result)
        assert not connect_result(port, "alice", ACCOUNTS["alice"]).is_failure


@pytest.mark.parametrize("kind", KINDS)
def test_impersonation_has_no_effect(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with secured(kind, request, tmp_path) as port:
        alice, bob = user("alice", port), user("bob", port)
        alice.connect_chat()
        bob.connect_chat()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        # mallory publishes to bob's command topics: as a message, as a group creation, as a disconnect
        mallory = paho.Client(CallbackAPIVersion.VERSION2, client_id="mallory:raw")
        mallory.username_pw_set("mallory", ACCOUNTS["mallory"])
        connected = threading.Event()
        mallory.on_connect = lambda *a: connected.set()
        mallory.connect("127.0.0.1", port)
        mallory.loop_start()
        assert connected.wait(10)  # (a publish before the CONNACK would fail in paho)
        forged = [
            ("send-message", {"conversation_id": cid, "body": "send me your password", "request_id": "f1"}),
            ("send-message", {"conversation_id": "global", "body": "forged", "request_id": "f2"}),
            ("disconnect", {"session_id": bob.session_id}),
            ("create-conversation", {"kind": "group", "participants": ["mallory"], "request_id": "f3"}),
        ]
        for command, fields in forged:
            info = mallory.publish(f"chat/v1/users/bob/commands/{command}", orjson.dumps(fields), qos=1)
            info.wait_for_publish(10)
        mallory.disconnect()
        mallory.loop_stop()
        # Everything published before this round trip has been handled: nothing of it happened.
        history = alice.request("get-messages", conversation_id=cid, since_seq=0)["data"]["messages"]
        assert history == []
        assert alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"] == []
        active = [u["user_id"] for u in alice.request("get-active-users")["data"]["users"]]
        assert active == ["alice", "bob"]
        assert [c["conversation_id"] for c in bob.request("get-conversations")["data"]["conversations"]] == [
            "global",
            cid,
        ]
        assert [e for e in bob.seen if (e.get("request_id") or "").startswith("f")] == []
        alice.stop()
        bob.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_eavesdropping_reads_nothing_of_bobs(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with secured(kind, request, tmp_path) as port:
        # alice leaves a retained command behind: it must neither leak nor ever be applied
        retained = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:retained")
        retained.username_pw_set("alice", ACCOUNTS["alice"])
        retained.connect("127.0.0.1", port)
        retained.loop_start()
        retained.publish(
            "chat/v1/users/alice/commands/send-message",
            b'{"conversation_id":"global","body":"retained secret"}',
            qos=1,
            retain=True,
        ).wait_for_publish(10)
        retained.disconnect()
        retained.loop_stop()

        spies = [
            Spy("mallory", port, ["chat/v1/users/bob/inbox"]),
            Spy("mallory", port, ["chat/v1/#"]),
            Spy("mallory", port, ["#"]),
            Spy("mallory", port, ["chat/v1/conversations/#", "chat/v1/users/+/inbox"]),
        ]
        alice, bob = user("alice", port), user("bob", port)
        alice.connect_chat()
        bob.connect_chat()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        alice.request("send-message", conversation_id=cid, body="for bob only")
        assert bob.next_of("message-added")["data"]["message"]["body"] == "for bob only"
        # A round trip through the broker for every spy: what reached bob has been routed to spies too.
        probe = Spy("mallory", port, ["chat/v1/users/mallory/inbox"])
        probe.stop()
        for spy in spies:
            spy.stop()
            leaked = [
                (t, p)
                for t, p in spy.got
                if "/users/bob/" in t
                or "/conversations/" in t
                or b"for bob only" in p
                or b"retained secret" in p
                or "/commands/" in t
            ]
            assert leaked == [], leaked
            assert all(t.startswith(("chat/v1/presence/", "chat/v1/bridge/status")) for t, _ in spy.got), (
                spy.got
            )
        # Both brokers refuse a retained command outright: it is neither kept nor applied
        applied = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
        assert [(m["sender_id"], m["body"]) for m in applied] == []
        alice.stop()
        bob.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_observer_reads_conversations(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with secured(kind, request, tmp_path) as port:
        observer = Spy("chat-observer", port, ["chat/v1/conversations/#"])
        alice = user("alice", port)
        alice.connect_chat()
        alice.request("send-message", conversation_id="global", body="visible to the observer")
        alice.request("get-active-users")
        observer.stop()
        assert any(
            t == "chat/v1/conversations/global/events" and b"visible to the observer" in p
            for t, p in observer.got
        ), observer.got
        alice.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_forged_will_never_reaches_bob(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with secured(kind, request, tmp_path) as port:
        alice, bob = user("alice", port), user("bob", port)
        alice.connect_chat()
        bob.connect_chat()
        # mallory's own chat session, whose will is legitimate: it tells us when wills have been handled
        honest = user("mallory", port)
        honest.connect_chat()
        forger = paho.Client(CallbackAPIVersion.VERSION2, client_id="mallory:forger")
        forger.username_pw_set("mallory", ACCOUNTS["mallory"])
        forger.will_set(
            "chat/v1/users/bob/commands/disconnect",
            orjson.dumps({"session_id": bob.session_id, "reason": "lost"}),
            qos=1,
        )
        try:
            forger.connect("127.0.0.1", port)
            forger.loop_start()
        except OSError:
            pass  # refused outright (the embedded broker does): also fine
        alice.wait_for(lambda e: e["type"] == "user-connected" and e["data"]["user"]["user_id"] == "mallory")
        # Both of mallory's connections die without DISCONNECT: brokers publish their wills.
        for c in (forger, honest.client):
            c.loop_stop()
            sock = c.socket()
            if sock is not None:
                sock.close()
        gone = alice.wait_for(lambda e: e["type"] == "user-disconnected", timeout=15)
        assert gone["data"] == {"user_id": "mallory"}
        active = [u["user_id"] for u in alice.request("get-active-users")["data"]["users"]]
        assert active == ["alice", "bob"]
        alice.stop()
        bob.stop()
