"""Clients that die, freeze or flood; a bridge that is away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from chatclient import ChatClient
from conftest import EmbeddedBroker, Mosquitto, running_bridge

CLIENT = Path(__file__).resolve().parent.parent / "client_process.py"


@contextmanager
def client_process(user: str, port: int, keepalive: int) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), user, "127.0.0.1", str(port), str(keepalive)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the client is connected to the chat (or died)
        assert line.startswith("READY "), f"client process failed: {line!r}"
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)


def observer(port: int) -> ChatClient:
    bob = ChatClient("bob", "127.0.0.1", port).start()
    bob.connect_chat()
    return bob


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_sigkilled_client_is_reported_disconnected(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue("mosquitto" if broker == "mosquitto" else "embedded_broker")
    port = server.port
    publisher = server.publisher() if broker == "embedded" else None
    with running_bridge(port, f"sqlite:///{tmp_path / 'c.sqlite3'}", publisher=publisher):
        bob = observer(port)
        with client_process("carol", port, keepalive=30) as (proc, _session):
            bob.wait_for(lambda e: e["type"] == "user-connected" and e["data"]["user"]["user_id"] == "carol")
            proc.kill()  # SIGKILL: the socket closes, the broker publishes carol's will
            gone = bob.next_of("user-disconnected", timeout=10)
            assert gone["data"] == {"user_id": "carol"}
            users = bob.request("get-active-users")["data"]["users"]
            assert [u["user_id"] for u in users] == ["bob"]
        bob.stop()


def test_sigstopped_client_will_fires_on_embedded_broker(
    embedded_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """amqtt alone never fires this will (upstream #308); our watchdog must, within 1.5 x keepalive + ~1 s."""
    keepalive = 2
    with running_bridge(
        embedded_broker.port, f"sqlite:///{tmp_path / 'c.sqlite3'}", publisher=embedded_broker.publisher()
    ):
        bob = observer(embedded_broker.port)
        with client_process("dave", embedded_broker.port, keepalive=keepalive) as (proc, _session):
            bob.wait_for(lambda e: e["type"] == "user-connected" and e["data"]["user"]["user_id"] == "dave")
            os.kill(proc.pid, signal.SIGSTOP)  # frozen: the socket stays open, nothing is sent
            stopped = time.monotonic()
            gone = bob.next_of("user-disconnected", timeout=keepalive * 1.5 + 5)
            elapsed = time.monotonic() - stopped
            assert gone["data"] == {"user_id": "dave"}
            # Not before the keepalive allows (the client may have just pinged), not much after 1.5x.
            assert keepalive * 0.5 <= elapsed <= keepalive * 1.5 + 1.5, elapsed
        bob.stop()


def test_live_client_with_short_keepalive_is_not_dropped(
    embedded_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The watchdog must not cut a client that pings on time."""
    with running_bridge(
        embedded_broker.port, f"sqlite:///{tmp_path / 'c.sqlite3'}", publisher=embedded_broker.publisher()
    ):
        erin = ChatClient("erin", "127.0.0.1", embedded_broker.port, keepalive=1).start()
        erin.connect_chat()
        erin.next_of("user-connected")
        # Over 4 keepalive periods the client stays connected and its commands are answered.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert erin.request("get-active-users", timeout=5)["type"] == "active-users"
            with pytest.raises(TimeoutError):
                erin.next_of("user-disconnected", timeout=0.5)
        assert erin.client.is_connected()
        erin.stop()


def test_burst_arrives_in_order_without_gaps(mosquitto: Mosquitto, database_url: str) -> None:
    n = 500
    with running_bridge(mosquitto.port, database_url):
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        bob = observer(mosquitto.port)
        alice.connect_chat()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        for i in range(n):
            alice.client.publish(
                alice.topic("send-message"),
                f'{{"conversation_id":"{cid}","body":"msg {i}","client_msg_id":"b{i}"}}',
                qos=1,
            )
        got = [
            bob.wait_for(lambda e: e["type"] == "message-added", timeout=30)["data"]["message"]
            for _ in range(n)
        ]
        assert [m["seq"] for m in got] == list(range(1, n + 1))
        assert [m["body"] for m in got] == [f"msg {i}" for i in range(n)]  # one publisher: its order is kept
        seqs: list[int] = []
        while True:  # pages are also cut by bytes (the event size limit): follow has_more
            page = bob.request(
                "get-messages", conversation_id=cid, since_seq=seqs[-1] if seqs else 0, limit=500
            )["data"]
            seqs += [m["seq"] for m in page["messages"]]
            if not page["has_more"]:
                break
        assert seqs == list(range(1, n + 1))
        alice.stop()
        bob.stop()


def test_commands_sent_while_the_bridge_is_down_are_applied_on_return(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    with running_bridge(mosquitto.port, db):  # first start creates the bridge's persistent session
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.connect_chat()
        bob = observer(mosquitto.port)
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
    # The bridge is down: the broker keeps these for its persistent session.
    for i in range(20):
        alice.send("send-message", conversation_id=cid, body=f"while away {i}", client_msg_id=f"w{i}")
    with running_bridge(mosquitto.port, db):
        got = [
            bob.wait_for(lambda e: e["type"] == "message-added", timeout=15)["data"]["message"]
            for _ in range(20)
        ]
        assert [m["body"] for m in got] == [f"while away {i}" for i in range(20)]
        assert [m["seq"] for m in got] == list(range(1, 21))
    alice.stop()
    bob.stop()


class FlakyUnitOfWork:
    """A SQL unit of work whose database can be 'down': every transaction then fails as an outage would."""

    def __init__(self, inner: object) -> None:
        import threading

        self.inner = inner
        self.down = threading.Event()
        self.failed_attempts = threading.Semaphore(0)

    def transaction(self):  # type: ignore[no-untyped-def]
        from bridge.model import StorageUnavailable

        if self.down.is_set():
            self.failed_attempts.release()
            raise StorageUnavailable("database is down")
        return self.inner.transaction()  # type: ignore[attr-defined]


def test_commands_are_acknowledged_only_after_commit(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A command the bridge could not commit stays unacknowledged, so the broker hands it to the next bridge.

    (A client's own PUBACK comes from the broker; the bridge's manual ack is what decides redelivery.)
    """
    from bridge.config import BrokerAddress
    from bridge.paho_transport import PahoTransport
    from bridge.pipeline import Pipeline
    from bridge.runtime import Bridge
    from bridge.service import Service
    from bridge.sql import TRANSIENT_ERRORS, SqlUnitOfWork, init_db, is_transient, make_engine
    from bridge.topics import Topics

    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    engine = make_engine(db)
    init_db(engine, 0)
    uow = FlakyUnitOfWork(SqlUnitOfWork(engine))
    topics = Topics("chat/v1")
    first = Bridge(
        Pipeline(
            Service(uow, epoch="e1", transient=TRANSIENT_ERRORS),  # type: ignore[arg-type]
            PahoTransport(BrokerAddress("127.0.0.1", mosquitto.port), topics.commands),
            topics,
            is_transient=is_transient,
        )
    )
    first.start()
    assert first.ready.wait(15)
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    alice.connect_chat()
    uow.down.set()
    alice.send("send-message", conversation_id="global", body="kept", request_id="k1")
    assert uow.failed_attempts.acquire(timeout=15)  # the bridge has it and cannot commit it
    first.stop()  # gives up without acknowledging
    with running_bridge(mosquitto.port, db):
        answer = alice.answer("k1", timeout=15)
        assert answer["type"] == "message-added" and answer["data"]["message"]["body"] == "kept"
        history = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
        assert [m["body"] for m in history] == ["kept"]
    alice.stop()


def test_a_retained_command_is_applied_once_never_replayed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    with running_bridge(mosquitto.port, db):
        alice.client.publish(
            alice.topic("send-message"), b'{"conversation_id":"global","body":"sticky"}', qos=1, retain=True
        ).wait_for_publish(10)
        alice.next_of("message-added")
    for _ in range(2):  # each start re-subscribes, and the broker hands over the retained copy again
        with running_bridge(mosquitto.port, db):
            history = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
            assert [m["body"] for m in history] == ["sticky"]
    alice.stop()


def test_events_committed_but_never_published_are_published_by_the_next_bridge(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Crash after commit, before publish: the outbox keeps the events; the next start publishes them."""
    from sqlalchemy import select

    from bridge.sql import make_engine, outbox

    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
    with running_bridge(mosquitto.port, db) as bridge:
        alice.connect_chat()
        bob.connect_chat()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        bob.next_of("conversation-created")
        bridge.pipeline._send = lambda batch: None  # type: ignore[attr-defined]  # dies before publishing, after commit
        alice.send(
            "send-message", conversation_id=cid, body="committed, not yet published", request_id="lost?"
        )
        with pytest.raises(TimeoutError):
            alice.answer("lost?", timeout=2)
    engine = make_engine(db)
    with engine.connect() as conn:
        stored = [r.payload for r in conn.execute(select(outbox)).all() if b"committed, not yet" in r.payload]
    engine.dispose()
    assert len(stored) == 3  # alice's answer, bob's copy, the conversation topic
    with running_bridge(mosquitto.port, db):
        answer = alice.answer("lost?", timeout=15)
        assert answer["type"] == "message-added"
        copy = bob.next_of("message-added", timeout=15)
        assert copy["data"] == answer["data"] and copy["event_id"] == answer["event_id"]
        assert answer["event_id"] in stored[0].decode()
    alice.stop()
    bob.stop()


def test_the_outbox_is_emptied_once_the_broker_acknowledged(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from bridge.sql import make_engine, outbox

    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    with running_bridge(mosquitto.port, db):
        alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
        alice.connect_chat()
        for i in range(20):
            alice.request("send-message", conversation_id="global", body=f"m{i}")
        engine = make_engine(db)
        left = threading.Event()

        def empty() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(outbox)).scalar() == 0

        # the worker forgets acknowledged batches with the next commit or when idle (within about a second)
        for _ in range(100):
            if empty():
                left.set()
                break
            left.wait(0.1)
        assert left.is_set(), "the outbox kept events the broker had acknowledged"
        engine.dispose()
        alice.stop()
