"""A small chat client over paho, as a real app would write one: will, inbox, connect."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from chat_bridge._paho import OrderedClient

Event = dict[str, Any]


class ChatClient:
    def __init__(
        self,
        user: str,
        host: str,
        port: int,
        *,
        prefix: str = "chat/v1",
        keepalive: int = 30,
        client_id: str | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        transport: str = "tcp",  # or "websockets" (path /mqtt)
    ) -> None:
        self.user = user
        self.prefix = prefix
        self.session_id = uuid.uuid4().hex[:16]
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.retained: dict[str, Any] = {}
        self._retained_changed = threading.Condition()
        self._subscribed = threading.Event()
        self._counter = 0
        self.client = OrderedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{user}:{self.session_id}",
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            transport=transport,  # type: ignore[arg-type]
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if username:
            self.client.username_pw_set(username, password)
        will = orjson.dumps({"session_id": self.session_id, "reason": "lost"})
        self.client.will_set(self.topic("disconnect"), will, qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.host, self.port, self.keepalive = host, port, keepalive

    def topic(self, command: str) -> str:
        return f"{self.prefix}/users/{self.user}/commands/{command}"

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(
            [
                (f"{self.prefix}/users/{self.user}/inbox", 1),
                (f"{self.prefix}/bridge/status", 1),
                (f"{self.prefix}/presence/+", 1),
            ]
        )

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = orjson.loads(msg.payload) if msg.payload else None
        if msg.topic.endswith("/inbox"):
            self.events.put(body)
        else:
            with self._retained_changed:
                self.retained[msg.topic] = body
                self._retained_changed.notify_all()

    def start(self, timeout: float = 10) -> ChatClient:
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"{self.user}: no SUBACK")
        return self

    def send(self, command: str, **fields: Any) -> str:
        self._counter += 1
        rid = fields.pop("request_id", f"{self.user}-{self._counter}")
        self.publish_raw(command, orjson.dumps({"request_id": rid, **fields}))
        return rid

    def publish_raw(self, command: str, payload: bytes) -> None:
        self.client.publish(self.topic(command), payload, qos=1).wait_for_publish(10)

    def connect_chat(self, **fields: Any) -> Event:
        rid = self.send("connect", session_id=self.session_id, **fields)
        return self.answer(rid)

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 10) -> Event:
        for e in self.seen:
            if match(e):
                self.seen.remove(e)
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.user}: no matching event; unmatched: {self.seen[-5:]}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if match(e):
                return e
            self.seen.append(e)

    def answer(self, request_id: str, timeout: float = 10) -> Event:
        return self.wait_for(lambda e: e.get("request_id") == request_id, timeout)

    def request(self, command: str, timeout: float = 10, **fields: Any) -> Event:
        return self.answer(self.send(command, **fields), timeout)

    def next_of(self, event_type: str, timeout: float = 10) -> Event:
        return self.wait_for(lambda e: e["type"] == event_type, timeout)

    def wait_retained(self, topic: str, match: Callable[[Any], bool], timeout: float = 10) -> Any:
        def matched() -> bool:
            value = self.retained.get(topic)
            return value is not None and match(value)

        with self._retained_changed:
            if not self._retained_changed.wait_for(matched, timeout):
                raise TimeoutError(f"{self.user}: {topic} never matched; last {self.retained.get(topic)}")
            return self.retained[topic]

    def stop(self, *, clean: bool = True) -> None:
        if clean:
            self.client.publish(
                self.topic("disconnect"),
                orjson.dumps({"session_id": self.session_id, "reason": "client"}),
                qos=1,
            )
            self.client.disconnect()
        self.client.loop_stop()
