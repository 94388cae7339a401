"""A stand-in for paho's Client (no network) and a scripted bridge behind it, for the SDK's unit tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

Answer = Callable[[str, dict[str, Any]], list[dict[str, Any]] | None]


class Reason:
    def __init__(self, failure: bool = False, text: str = "Success") -> None:
        self.is_failure = failure
        self.text = text

    def __str__(self) -> str:
        return self.text


class Info:
    rc = 0

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None

    def is_published(self) -> bool:
        return True


class FakeMqtt:
    """Records what the SDK does; `drop()`/`reconnect()` play the network; `deliver()` plays the broker."""

    def __init__(self, client_id: str, clean_session: bool, bridge: FakeBridge) -> None:
        self.client_id, self.clean_session, self.bridge = client_id, clean_session, bridge
        self.wills: list[dict[str, Any]] = []
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.subscriptions: list[Any] = []
        self.credentials: tuple[str | None, str | None] | None = None
        self.tls: object = None
        self.connected = False
        self.subscribed = True
        self.on_pre_connect: Any = None
        self.on_connect: Any = None
        self.on_disconnect: Any = None
        self.on_subscribe: Any = None
        self.on_message: Any = None
        self.on_socket_open: Any = None
        bridge.clients.append(self)

    # the paho surface the SDK uses
    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        assert qos == 1 and not retain and topic.endswith("/commands/disconnect")
        self.wills.append(json.loads(payload))

    def username_pw_set(self, username: str | None, password: str | None = None) -> None:
        self.credentials = (username, password)

    def tls_set_context(self, context: object = None) -> None:
        self.tls = context or "default"

    def reconnect_delay_set(self, min_delay: int = 1, max_delay: int = 120) -> None:
        pass

    def connect_async(self, host: str, port: int = 1883, keepalive: int = 60) -> None:
        self.address = (host, port, keepalive)

    def move_to(self, host: str, port: int) -> None:
        self.address = (host, port, self.address[2])

    def loop_start(self) -> None:
        if self.bridge.broker_up:
            self.reconnect()

    def loop_stop(self) -> None:
        pass

    def subscribe(self, topic: Any, qos: int = 0) -> None:
        self.subscriptions.append(topic)
        refused = self.bridge.refuse_subscriptions > 0
        self.bridge.refuse_subscriptions -= 1 if refused else 0
        self.subscribed = not refused  # refused: nothing reaches the inbox
        self.on_subscribe(
            self, None, 1, [Reason(refused, "Unspecified error" if refused else "Granted QoS 1")], None
        )

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Info:
        assert qos == 1
        command = topic.rsplit("/", 1)[1]
        fields = json.loads(payload)
        self.published.append((command, fields))
        if self.connected:
            self.bridge.handle(self, command, fields)
        return Info()

    def disconnect(self) -> None:
        self.connected = False

    # the network, as the tests play it
    def reconnect(self) -> None:
        self.on_pre_connect(self, None)
        self.connected = True
        self.on_connect(self, None, {}, Reason(), None)

    def drop(self) -> None:
        self.connected = False
        self.on_disconnect(self, None, {}, Reason(True, "lost"), None)

    def deliver(self, topic: str, body: dict[str, Any]) -> None:
        msg = paho.MQTTMessage(topic=topic.encode())
        msg.payload = json.dumps(body).encode()
        self.on_message(self, None, msg)

    def inbox(self, body: dict[str, Any]) -> None:
        user = self.client_id.split(":")[0]
        self.deliver(f"chat/v1/users/{user}/inbox", body)

    def commands(self, name: str) -> list[dict[str, Any]]:
        return [fields for command, fields in self.published if command == name]


class FakeBridge:
    """Answers `connect` with `connected`; other commands with what `answer` returns (None: silence)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.clients: list[FakeMqtt] = []
        self.answer = answer
        self.conversations: list[dict[str, Any]] = []
        self.broker_up = True
        self.refuse_subscriptions = 0  # the next subscribes the broker refuses
        self.lock = threading.Lock()

    def factory(self, client_id: str, clean_session: bool) -> FakeMqtt:
        return FakeMqtt(client_id, clean_session, self)

    def handle(self, client: FakeMqtt, command: str, fields: dict[str, Any]) -> None:
        if not client.subscribed:
            return  # applied, but its answer never reaches an inbox nobody subscribed to
        user = client.client_id.split(":")[0]
        if command == "connect":
            events: list[dict[str, Any]] | None = [
                event(
                    "connected",
                    {
                        "user": {"user_id": user, "display_name": None, "active": True},
                        "session_id": fields["session_id"],
                        "conversations": self.conversations,
                        "active_users": [],
                    },
                )
            ]
        elif command == "disconnect":
            events = []
        else:
            events = self.answer(command, fields) if self.answer else None
        for e in events or []:
            client.inbox({**e, "request_id": fields.get("request_id")} if "request_id" not in e else e)


def event(type_: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"type": type_, "ts": "2026-11-24T10:00:00.000Z", "data": data}
    if event_id:
        e["event_id"] = event_id
    return e


def conversation(cid: str, last_seq: int = 0, last_rev: int | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "conversation_id": cid,
        "kind": "group",
        "title": None,
        "owner_id": "alice",
        "participants": ["alice", "bob"],
        "parent_conversation_id": None,
        "parent_message_id": None,
        "created_at": "2026-11-24T10:00:00.000Z",
        "last_seq": last_seq,
    }
    if last_rev is not None:
        c.update(last_rev=last_rev, read_seq=0, unread=last_seq)
    return c


def message(
    cid: str, seq: int, rev: int | None = None, body: str = "hi", sender: str = "bob"
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "message_id": f"m{cid}{seq}",
        "conversation_id": cid,
        "seq": seq,
        "sender_id": sender,
        "body": body,
        "client_msg_id": None,
        "created_at": "2026-11-24T10:00:00.000Z",
    }
    if rev is not None:
        m.update(rev=rev, edited_at=None, deleted_at=None, reactions={})
    return m
