"""The embedded broker's direct delivery of the bridge's events (bridge/delivery.py): who gets an
event, persistent sessions' queues, slow and silent subscribers, order.

Events are handed to the broker as `chat-bridge serve` hands them (`InProcessPublisher`), and read by
raw MQTT clients that acknowledge when the test says so."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from chatclient import ChatClient
from conftest import ACCOUNTS, EmbeddedBroker, running_bridge, write_accounts

from bridge.mqtt_codec import (
    Connack,
    Connect,
    Decoder,
    Publish,
    Suback,
    encode_connect,
    encode_puback,
    encode_subscribe,
)
from bridge.topics import Topics

P = "chat/v1"


class Subscriber:
    """A raw MQTT client on a socket: records every PUBLISH it reads (with its DUP flag) and sends
    each PUBACK only when `acking` (else on `ack_all`)."""

    def __init__(
        self,
        port: int,
        client_id: str,
        user: str,
        *topics: str,
        clean_session: bool = True,
        acking: bool = True,
    ) -> None:
        self.acking = acking
        self.got: list[Publish] = []
        self.unacked: list[int] = []
        self.session_present: bool | None = None
        self.closed = threading.Event()
        self._changed = threading.Condition()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._decoder = Decoder()
        self._sock.sendall(
            encode_connect(
                Connect(
                    client_id,
                    clean_session=clean_session,
                    keepalive=60,
                    username=user,
                    password=ACCOUNTS[user].encode(),
                )
            )
        )
        self._packets: list[Any] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        connack = self._next(Connack)
        assert connack.return_code == 0, connack
        self.session_present = connack.session_present
        if topics:
            self._sock.sendall(encode_subscribe(1, [(t, 1) for t in topics]))
            suback = self._next(Suback)
            assert all(code != 0x80 for code in suback.return_codes), suback

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                for packet in self._decoder.feed(data):
                    with self._changed:
                        if isinstance(packet, Publish):
                            self.got.append(packet)
                            if packet.qos:
                                if self.acking:
                                    self._sock.sendall(encode_puback(packet.packet_id))
                                else:
                                    self.unacked.append(packet.packet_id)
                        else:
                            self._packets.append(packet)
                        self._changed.notify_all()
        except OSError:
            pass
        finally:
            self.closed.set()
            with self._changed:
                self._changed.notify_all()

    def _next(self, kind: type) -> Any:
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(isinstance(p, kind) for p in self._packets) or self.closed.is_set(), 10
            ), f"no {kind.__name__}"
            for p in self._packets:
                if isinstance(p, kind):
                    self._packets.remove(p)
                    return p
        raise AssertionError(f"closed before a {kind.__name__}")

    def wait_for(self, count: int, timeout: float = 10) -> list[Publish]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.got) >= count, timeout), (
                f"{len(self.got)} of {count} events"
            )
            return list(self.got)

    def ack_all(self) -> None:
        with self._changed:
            ids, self.unacked = self.unacked, []
            self.acking = True
        self._sock.sendall(b"".join(encode_puback(i) for i in ids))

    def bodies(self) -> list[int]:
        return [orjson.loads(p.payload)["n"] for p in self.got]

    def drop(self) -> None:
        """Vanishes without DISCONNECT (the broker sees the connection end)."""
        with contextlib.suppress(OSError):  # (shutdown wakes the reader's recv; close alone does not)
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        assert self.closed.wait(5)


@contextmanager
def broker_with_accounts(tmp_path: Path, **options: Any) -> Iterator[EmbeddedBroker]:
    from bridge.broker import Security

    broker = EmbeddedBroker(
        Security(write_accounts(tmp_path / "passwd"), "internal-secret"), **options
    ).start()
    try:
        yield broker
    finally:
        broker.stop()


def publish(broker: EmbeddedBroker, *events: tuple[str, int], retain: bool = False) -> None:
    """Hands events (topic, n) to the broker as the bridge does; returns once it took them."""
    handed = broker.publisher()  # type: ignore[operator]
    handed([(topic, orjson.dumps({"n": n}), retain) for topic, n in events]).result(10)  # type: ignore[operator]


def session_of(broker: EmbeddedBroker, client_id: str) -> Any:
    return broker.broker._sessions[client_id][0]


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_event_reaches_exactly_the_sessions_allowed_to_read_it(tmp_path: Path) -> None:
    """Through the bridge: bob's two devices get his copy, the observer (a wildcard on the
    conversations) the conversation's event, alice her answer; mallory, subscribed to every inbox and
    to everything, none of it (the topic rules say what a session may read, whatever it subscribed)."""
    from bridge.broker import Security

    security = Security(write_accounts(tmp_path / "passwd"), "internal-secret")
    broker = EmbeddedBroker(security).start()
    try:
        with running_bridge(
            broker.port,
            f"sqlite:///{tmp_path / 'c.sqlite3'}",
            credentials="chat-bridge:internal-secret",
            publisher=broker.publisher(),
        ):
            phone = Subscriber(broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox")
            laptop = Subscriber(broker.port, "bob:laptop", "bob", f"{P}/users/+/inbox", f"{P}/presence/+")
            observer = Subscriber(broker.port, "chat-observer", "chat-observer", f"{P}/conversations/#")
            mallory = Subscriber(
                broker.port, "mallory:x", "mallory", f"{P}/users/+/inbox", "#", f"{P}/conversations/#"
            )
            alice = ChatClient(
                "alice", "127.0.0.1", broker.port, username="alice", password=ACCOUNTS["alice"]
            ).start()
            try:
                alice.connect_chat()
                bob = ChatClient(
                    "bob",
                    "127.0.0.1",
                    broker.port,
                    username="bob",
                    password=ACCOUNTS["bob"],
                    client_id="bob:chat",
                ).start()
                bob.connect_chat()
                created = alice.request("create-conversation", kind="direct", participants=["bob"])
                cid = created["data"]["conversation"]["conversation_id"]
                sent = alice.request("send-message", conversation_id=cid, body="for bob only")
                assert sent["type"] == "message-added"
                bob.wait_for(lambda e: e.get("type") == "message-added")

                def added(s: Subscriber) -> list[Publish]:
                    return [
                        p for p in s.got if b'"message-added"' in p.payload and b"for bob only" in p.payload
                    ]

                wait_until(lambda: added(phone) and added(laptop) and added(observer))
                assert [p.topic for p in added(phone)] == [f"{P}/users/bob/inbox"]
                assert [p.topic for p in added(laptop)] == [f"{P}/users/bob/inbox"]  # once, not per filter
                assert [p.topic for p in added(observer)] == [f"{P}/conversations/{cid}/events"]
                # mallory may read presence and the bridge's status, nothing of alice's and bob's
                probe = ChatClient(
                    "alice", "127.0.0.1", broker.port, username="alice", password=ACCOUNTS["alice"]
                ).start()
                probe.request("get-active-users")  # everything before it was delivered
                probe.stop()
                assert all(
                    p.topic.startswith(f"{P}/presence/") or p.topic == Topics(P).status for p in mallory.got
                ), [p.topic for p in mallory.got]
                assert not [p for p in mallory.got if b"for bob only" in p.payload]
                bob.stop()
            finally:
                alice.stop()
                for s in (phone, laptop, observer, mallory):
                    s.drop()
    finally:
        broker.stop()


def test_an_offline_persistent_session_gets_its_queue_on_reconnect(tmp_path: Path) -> None:
    with broker_with_accounts(tmp_path) as broker:
        bob = Subscriber(broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox", clean_session=False)
        publish(broker, (f"{P}/users/bob/inbox", 0))
        bob.wait_for(1)
        bob.drop()
        wait_until(lambda: session_of(broker, "bob:phone").transitions.state == "disconnected")
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(1, 101)])
        again = Subscriber(broker.port, "bob:phone", "bob", clean_session=False)
        assert again.session_present
        again.wait_for(100)
        assert again.bodies() == list(range(1, 101))
        again.drop()


def test_a_slow_subscriber_gets_every_event(tmp_path: Path) -> None:
    """bob's client reads its events but acknowledges none for longer than amqtt's 5 s PUBACK timeout,
    then its connection drops: its persistent session sends every one of them again on its next
    connection. amqtt dropped an event at the timeout (and at the connection's end), so the client
    never got again what it had not acknowledged. (The wait is amqtt's timer, not a guess.)"""
    with broker_with_accounts(tmp_path) as broker:
        bob = Subscriber(
            broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox", clean_session=False, acking=False
        )
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(20)])
        bob.wait_for(20)
        held_until = time.monotonic() + 6.0  # past amqtt's 5 s wait for a PUBACK
        while time.monotonic() < held_until:
            assert not bob.closed.is_set()  # a slow client is not disconnected for being slow
            time.sleep(0.1)
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(20, 30)])
        bob.wait_for(30)
        bob.drop()
        wait_until(lambda: session_of(broker, "bob:phone").transitions.state == "disconnected")
        again = Subscriber(broker.port, "bob:phone", "bob", clean_session=False)
        again.wait_for(30)
        assert again.bodies() == list(range(30))
        assert all(p.dup for p in again.got)  # sent before: flagged as such
        again.drop()


def test_a_slow_acknowledger_still_gets_everything_while_connected(tmp_path: Path) -> None:
    """More events than the window of unacknowledged ones: the rest wait, in order, and go as the
    PUBACKs come, however late."""
    with broker_with_accounts(tmp_path) as broker:
        bob = Subscriber(broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox", acking=False)
        count = 200  # over the window (bridge/delivery.py)
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(count)])
        bob.wait_for(20)
        bob.ack_all()
        bob.wait_for(count)
        assert bob.bodies() == list(range(count))
        bob.drop()


def test_a_subscriber_that_never_acknowledges_is_disconnected_at_the_cap(tmp_path: Path) -> None:
    """A client that reads nothing and acknowledges nothing cannot make the broker hold events without
    end: at `max_queued` events its connection is closed; its persistent session keeps at most the
    offline queue's cap, and gets them on its next connection."""
    from bridge.broker import Caps
    from bridge.delivery import queued

    with broker_with_accounts(tmp_path, caps=Caps(max_queued=50, offline_queue=40)) as broker:
        bob = Subscriber(
            broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox", clean_session=False, acking=False
        )
        alice = Subscriber(broker.port, "alice:x", "alice", f"{P}/users/alice/inbox")
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(200)])
        assert bob.closed.wait(10)
        wait_until(lambda: session_of(broker, "bob:phone").transitions.state == "disconnected")
        assert queued(session_of(broker, "bob:phone")) == 50  # what it held at the cap; more dropped
        publish(broker, (f"{P}/users/alice/inbox", 1))
        alice.wait_for(1)  # others are not affected
        again = Subscriber(broker.port, "bob:phone", "bob", clean_session=False)
        again.wait_for(50)
        assert again.bodies() == list(range(50))
        wait_until(lambda: queued(session_of(broker, "bob:phone")) == 0)
        again.drop()
        alice.drop()


def test_events_keep_their_order_per_subscriber_across_a_reconnect(tmp_path: Path) -> None:
    """Unacknowledged events when the connection drops, more while offline, more after: the session
    gets them all, once each beyond the ones sent again, in the order they were published."""
    with broker_with_accounts(tmp_path) as broker:
        bob = Subscriber(
            broker.port, "bob:phone", "bob", f"{P}/users/bob/inbox", clean_session=False, acking=False
        )
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(40)])
        bob.wait_for(40)
        bob.drop()
        wait_until(lambda: session_of(broker, "bob:phone").transitions.state == "disconnected")
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(40, 80)])
        again = Subscriber(broker.port, "bob:phone", "bob", clean_session=False)
        publish(broker, *[(f"{P}/users/bob/inbox", n) for n in range(80, 100)])
        again.wait_for(100)
        assert again.bodies() == list(range(100))
        again.drop()


def test_a_retained_event_reaches_later_subscribers(tmp_path: Path) -> None:
    with broker_with_accounts(tmp_path) as broker:
        early = Subscriber(broker.port, "alice:x", "alice", f"{P}/presence/+")
        publish(broker, (f"{P}/presence/bob", 7), retain=True)
        assert early.wait_for(1)[0].retain is False  # live: not flagged retained
        late = Subscriber(broker.port, "alice:y", "alice", f"{P}/presence/+")
        got = late.wait_for(1)
        assert got[0].topic == f"{P}/presence/bob" and got[0].retain
        early.drop()
        late.drop()
