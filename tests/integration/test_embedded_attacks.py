"""Attacks on the embedded broker with real MQTT clients: session hijacks before authentication,
forged wills, stolen queues, the bridge's client id, floods charged to the victim, and what an account
may hold. `serve --password-file` unless a test says otherwise."""

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
import paho.mqtt.client as paho
import pytest
from chatclient import ChatClient
from conftest import ACCOUNTS, EmbeddedBroker, free_port, running_bridge, write_accounts
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "chat/v1"


@pytest.fixture(autouse=True)
def _fresh_log_throttle() -> Iterator[None]:
    """The crowds here fill the minute's quota of amqtt's and the WebSockets listener's warning lines
    (`LogThrottle`, one per process): tests after them would see none of theirs."""
    yield
    from bridge.broker import _THROTTLE

    _THROTTLE._windows.clear()


@contextmanager
def embedded(tmp_path: Path, *, accounts: bool = True, **options: Any) -> Iterator[EmbeddedBroker]:
    """The embedded broker (with the accounts of ACCOUNTS unless told otherwise) and the bridge on it,
    as `chat-bridge serve` runs them: the bridge's events in-process."""
    from bridge.broker import Security

    security = Security(write_accounts(tmp_path / "passwd"), "internal-secret") if accounts else None
    broker = EmbeddedBroker(security, **options).start()
    try:
        with running_bridge(
            broker.port,
            f"sqlite:///{tmp_path / 'c.sqlite3'}",
            credentials=f"chat-bridge:{getattr(broker, 'secret', 'internal-secret')}",
            publisher=broker.publisher(),
        ):
            yield broker
    finally:
        broker.stop()


def user(name: str, port: int, **kw: Any) -> ChatClient:
    return ChatClient(name, "127.0.0.1", port, username=name, password=ACCOUNTS.get(name), **kw).start()


class Raw:
    """A raw paho client: connects as told and records its CONNACK, messages and disconnection."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        clean_session: bool = True,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 30,
        subscribe: tuple[str, ...] = (),
        transport: str = "tcp",  # or "websockets" (path /mqtt)
        source: str = "",  # the local address to connect from (another loopback address: another host)
    ) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.rc: Any = None
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.gone = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            transport=transport,  # type: ignore[arg-type]
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        self.client.reconnect_delay_set(30, 60)  # no quick automatic reconnects: we watch this one
        if username is not None:
            self.client.username_pw_set(username, password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.subscribe = subscribe
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: (self.gone.set(), self.answered.set())
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=keepalive, bind_address=source)
        self.client.loop_start()
        self.answered.wait(10)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.rc = rc
        if not rc.is_failure:
            self.connected.set()
            if self.subscribe:
                client.subscribe([(t, 1) for t in self.subscribe])
            else:
                self.subscribed.set()
        self.answered.set()

    @property
    def refused(self) -> bool:
        return self.rc is None or self.rc.is_failure

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanishes without DISCONNECT (its will fires)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def round_trip(client: ChatClient) -> None:
    """Everything published before this has been handled by the bridge."""
    client.request("get-active-users")


def dm(alice: ChatClient, other: str) -> str:
    created = alice.request("create-conversation", kind="direct", participants=[other])
    return str(created["data"]["conversation"]["conversation_id"])


# -- before any session work -------------------------------------------------------------------


@pytest.mark.parametrize("accounts", [True, False], ids=["accounts", "no-accounts"])
def test_an_unauthenticated_connect_with_the_bridges_client_id_changes_nothing(
    tmp_path: Path, accounts: bool
) -> None:
    """An unauthenticated CONNECT with the bridge's client id used to delete the bridge's session and
    subscription: no command was processed any more, status still `online`."""
    with embedded(tmp_path, accounts=accounts) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        for client_id, username, password in (
            ("chat-bridge", None, None),
            ("chat-bridge", "mallory", ACCOUNTS["mallory"]),
            ("chat-bridge", "chat-bridge", ACCOUNTS["chat-bridge"]),  # the password file's entry
            ("chat-bridge", "chat-bridge", "guess"),
            ("chat-bridge:w2", "chat-bridge", "guess"),
        ):
            attacker = Raw(broker.port, client_id, username, password)
            attacker.stop()
            answer = alice.request(
                "send-message", conversation_id="global", body=f"after {username}", timeout=5
            )
            assert answer["type"] == "message-added"
            assert attacker.refused, (client_id, username)
        alice.stop()


def test_an_unauthenticated_connect_with_a_users_client_id_does_not_silence_them(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        bob = user("bob", broker.port, client_id="bob:phone")
        alice.connect_chat()
        bob.connect_chat()
        cid = dm(alice, "bob")
        bob.next_of("conversation-created")
        for username, password in ((None, None), ("bob", "wrong"), ("mallory", ACCOUNTS["mallory"])):
            attacker = Raw(broker.port, "bob:phone", username, password)
            attacker.stop()
            alice.request("send-message", conversation_id=cid, body=f"after {username}")
            assert bob.next_of("message-added", timeout=5)["data"]["message"]["body"] == f"after {username}"
            assert attacker.refused, username
        alice.stop()
        bob.stop()


def test_a_refused_takeover_cannot_forge_commands_status_or_presence(tmp_path: Path) -> None:
    """A second CONNECT with a live connection's client id (wrong or other credentials) used to copy its
    will into the live session and publish it unchecked on the takeover: a send-message "from bob" was
    stored, a fake bridge status and presence reached subscribers."""
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        alice.wait_retained(f"{PREFIX}/bridge/status", lambda s: s["status"] == "online")
        epoch = alice.retained[f"{PREFIX}/bridge/status"]["epoch"]
        bob = user("bob", broker.port, client_id="bob:phone")
        bob.connect_chat()
        wills = [
            (f"{PREFIX}/users/bob/commands/send-message", b'{"conversation_id":"global","body":"from bob"}'),
            (
                f"{PREFIX}/bridge/status",
                b'{"status":"online","epoch":"forged","since":"2026-01-01T00:00:00.000Z"}',
            ),
            (
                f"{PREFIX}/presence/bob",
                b'{"user_id":"bob","status":"offline","since":"2026-01-01T00:00:00.000Z"}',
            ),
        ]
        for topic, payload in wills:
            for username, password in (("bob", "wrong"), ("mallory", ACCOUNTS["mallory"]), (None, None)):
                attacker = Raw(broker.port, "bob:phone", username, password, will=(topic, payload, True))
                attacker.stop()
        round_trip(alice)
        messages = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
        assert [m["body"] for m in messages] == []
        assert alice.retained[f"{PREFIX}/bridge/status"]["epoch"] == epoch
        assert alice.retained.get(f"{PREFIX}/presence/bob", {}).get("status") == "online"
        # bob's own connection is still there and still hears
        alice.request("send-message", conversation_id="global", body="hello bob")
        assert bob.next_of("message-added")["data"]["message"]["body"] == "hello bob"
        alice.stop()
        bob.stop()


def test_a_will_is_checked_when_it_is_published(tmp_path: Path) -> None:
    """bob's own reconnect takes over his live connection: the old connection's own will fires (its
    session ends), never the new connection's, and bob's new session stays."""
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        first = user("bob", broker.port, client_id="bob:phone")
        first.connect_chat()
        second = user("bob", broker.port, client_id="bob:phone")  # takes over: first's will fires
        second.connect_chat()
        first.client.loop_stop()
        round_trip(alice)
        active = [u["user_id"] for u in alice.request("get-active-users")["data"]["users"]]
        assert active == ["alice", "bob"], active
        alice.request("send-message", conversation_id="global", body="to the new one")
        assert second.next_of("message-added")["data"]["message"]["body"] == "to the new one"
        alice.stop()
        second.stop()


def test_nobody_reads_another_users_queued_messages(tmp_path: Path) -> None:
    """Mallory, with her own password and bob's client id, clean session false, used to receive bob's
    queued message-added events."""
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        bob = user("bob", broker.port, client_id="bob:phone", clean_session=False)
        bob.connect_chat()
        cid = dm(alice, "bob")
        bob.stop()
        for i in range(3):
            alice.request("send-message", conversation_id=cid, body=f"secret {i}")
        mallory = Raw(
            broker.port,
            "bob:phone",
            "mallory",
            ACCOUNTS["mallory"],
            clean_session=False,
            subscribe=(f"{PREFIX}/users/bob/inbox",),
        )
        assert mallory.refused
        time.sleep(0.5)  # what a resumed session would have replayed at once
        mallory.stop()
        assert [p for _t, p in mallory.got if b"secret" in p] == []
        alice.stop()


# -- publishing -------------------------------------------------------------------------------


def test_denied_publishes_do_not_drain_the_victims_flood_bucket(tmp_path: Path) -> None:
    """Mallory publishing (denied) to bob's command topic used to drain bob's bucket in the embedded
    flood guard: bob got a few of his answers."""
    with embedded(tmp_path, guard=(5.0, 20)) as broker:
        bob = user("bob", broker.port)
        bob.connect_chat()
        mallory = Raw(broker.port, "mallory:flood", "mallory", ACCOUNTS["mallory"])
        for i in range(100):
            mallory.client.publish(
                f"{PREFIX}/users/bob/commands/get-active-users", orjson.dumps({"request_id": f"m{i}"}), qos=1
            )
        mallory.publish(f"{PREFIX}/users/bob/commands/get-active-users", b"{}")
        mallory.stop()
        rids = [bob.send("get-active-users") for _ in range(10)]
        for rid in rids:
            assert bob.answer(rid)["type"] == "active-users"
        bob.stop()


def test_unknown_and_retained_commands_never_reach_the_bridge(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        alice.send("fly", request_id="unknown")
        alice.client.publish(
            alice.topic("send-message"),
            orjson.dumps({"request_id": "kept", "conversation_id": "global", "body": "kept"}),
            qos=1,
            retain=True,
        ).wait_for_publish(10)
        round_trip(alice)
        assert [e for e in alice.seen if e.get("request_id") in ("unknown", "kept")] == []
        assert alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"] == []
        assert not any(t.startswith(f"{PREFIX}/users/") for t in broker.broker._retained_messages)
        alice.stop()


def test_without_accounts_only_the_bridge_publishes_outside_command_topics(tmp_path: Path) -> None:
    """Without accounts anybody could delete the retained bridge status and presence (an empty
    retained publish) and the bridge never restored them."""
    with embedded(tmp_path, accounts=False) as broker:
        alice = ChatClient("alice", "127.0.0.1", broker.port).start()
        alice.connect_chat()
        alice.wait_retained(f"{PREFIX}/bridge/status", lambda s: s["status"] == "online")
        vandal = Raw(broker.port, "vandal")
        assert not vandal.refused
        for topic in (f"{PREFIX}/bridge/status", f"{PREFIX}/presence/alice"):
            vandal.publish(topic, b"", retain=True)
            vandal.publish(topic, b'{"status":"offline"}', retain=True)
        vandal.publish(f"{PREFIX}/users/bob/inbox", b'{"type":"message-added"}')
        vandal.stop()
        late = Raw(
            broker.port,
            "late",
            subscribe=(f"{PREFIX}/bridge/status", f"{PREFIX}/presence/+", f"{PREFIX}/users/+/inbox"),
        )
        assert late.subscribed.wait(10)
        round_trip(alice)
        deadline = time.monotonic() + 5
        while len({t for t, _ in late.got}) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = dict(late.got)
        assert orjson.loads(seen[f"{PREFIX}/bridge/status"])["status"] == "online"
        assert orjson.loads(seen[f"{PREFIX}/presence/alice"])["status"] == "online"
        assert f"{PREFIX}/users/bob/inbox" not in seen
        late.stop()
        alice.stop()


# -- what an account may hold ----------------------------------------------------------------------


def test_password_guessing_is_throttled_per_address(tmp_path: Path) -> None:
    with embedded(tmp_path) as broker:
        guesses = [Raw(broker.port, "bob:g", "bob", f"guess-{i}") for i in range(12)]
        assert all(g.refused for g in guesses)
        # from the same address, even the right password is not checked now
        right = Raw(broker.port, "bob:ok", "bob", ACCOUNTS["bob"])
        assert right.refused
        for c in (*guesses, right):
            c.stop()


def test_one_guesser_does_not_lock_out_the_others_at_its_address(tmp_path: Path) -> None:
    """Behind a reverse proxy or a NAT, every client has the same address: mallory's guesses must
    not keep alice and bob out."""
    with embedded(tmp_path) as broker:
        known = Raw(broker.port, "alice:a", "alice", ACCOUNTS["alice"])  # alice logged in from here
        assert not known.refused
        known.stop()
        guesses = [Raw(broker.port, "mallory:g", "mallory", f"guess-{i}") for i in range(12)]
        assert all(g.refused for g in guesses)
        assert Raw(broker.port, "mallory:ok", "mallory", ACCOUNTS["mallory"]).refused  # her own: held
        bob = Raw(broker.port, "bob:ok", "bob", ACCOUNTS["bob"])
        assert not bob.refused
        bob.stop()
        # guesses over many names hold the address back (100 in production, then one every 0.6 s;
        # 20 here, and none back during the test) ...
        broker.broker.failed_logins.address_burst = 20.0
        broker.broker.failed_logins.address_every_ms = 3_600_000
        flood = [Raw(broker.port, f"u{i}:g", f"u{i}", "x") for i in range(20)]
        assert all(f.refused for f in flood)
        from bridge.broker import _now_ms

        assert not broker.broker.failed_logins.allowed("127.0.0.1", "carol", _now_ms())  # new here
        # ... but not the accounts that logged in from it before
        again = Raw(broker.port, "alice:b", "alice", ACCOUNTS["alice"])
        assert not again.refused
        for c in (*guesses, *flood, again):
            c.stop()


def test_connections_and_persistent_sessions_are_capped_per_account(tmp_path: Path) -> None:
    from bridge.broker import Caps

    with embedded(tmp_path, caps=Caps(max_connections=3, max_sessions=2)) as broker:
        held = [Raw(broker.port, f"mallory:c{i}", "mallory", ACCOUNTS["mallory"]) for i in range(3)]
        assert not any(c.refused for c in held)
        extra = Raw(broker.port, "mallory:c3", "mallory", ACCOUNTS["mallory"])
        assert extra.refused
        for c in (*held, extra):
            c.stop()
        kept = []
        for i in range(2):
            c = Raw(broker.port, f"mallory:p{i}", "mallory", ACCOUNTS["mallory"], clean_session=False)
            assert not c.refused
            c.stop()
            kept.append(c)
        third = Raw(broker.port, "mallory:p2", "mallory", ACCOUNTS["mallory"], clean_session=False)
        assert third.refused
        third.stop()
        # the same device comes back: that is not a new session
        again = Raw(broker.port, "mallory:p0", "mallory", ACCOUNTS["mallory"], clean_session=False)
        assert not again.refused
        again.stop()
        # others are not affected by mallory's count
        bob = Raw(broker.port, "bob:p0", "bob", ACCOUNTS["bob"], clean_session=False)
        assert not bob.refused
        bob.stop()


def test_an_offline_persistent_sessions_queue_is_bounded(tmp_path: Path) -> None:
    from bridge.broker import Caps
    from bridge.delivery import queued

    with embedded(tmp_path, caps=Caps(offline_queue=5)) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        bob = user("bob", broker.port, client_id="bob:phone", clean_session=False)
        bob.connect_chat()
        cid = dm(alice, "bob")
        bob.stop()
        for i in range(20):
            alice.request("send-message", conversation_id=cid, body=f"m{i}")
        session, _handler = broker.broker._sessions["bob:phone"]
        assert queued(session) == 5
        alice.stop()


def test_removing_an_account_closes_its_connections(tmp_path: Path) -> None:
    from bridge import passwords

    with embedded(tmp_path) as broker:
        mallory = Raw(broker.port, "mallory:x", "mallory", ACCOUNTS["mallory"])
        bob = Raw(broker.port, "bob:x", "bob", ACCOUNTS["bob"])
        assert not mallory.refused and not bob.refused
        path = tmp_path / "passwd"
        entries = passwords.read(path)
        del entries["mallory"]
        passwords.write(path, entries)
        assert mallory.gone.wait(10)
        assert not bob.gone.is_set()
        again = Raw(broker.port, "mallory:y", "mallory", ACCOUNTS["mallory"])
        assert again.refused
        for c in (mallory, bob, again):
            c.stop()


def test_keepalive_zero_does_not_keep_a_frozen_client_online(tmp_path: Path) -> None:
    from bridge.broker import Caps

    with embedded(tmp_path, caps=Caps(max_keepalive=1)) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        frozen = ChatClient(
            "bob", "127.0.0.1", broker.port, username="bob", password=ACCOUNTS["bob"], keepalive=0
        ).start()
        frozen.connect_chat()
        frozen.client.loop_stop()  # frozen: the socket stays open, nothing more is sent
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            active = [u["user_id"] for u in alice.request("get-active-users")["data"]["users"]]
            if active == ["alice"]:
                break
            time.sleep(0.2)
        assert active == ["alice"]
        alice.stop()


def test_refused_connections_are_logged_at_a_bounded_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with embedded(tmp_path) as broker:
        caplog.clear()
        for i in range(30):
            Raw(broker.port, f"mallory:g{i}", "mallory", f"guess-{i}").stop()
        refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) <= 1, len(refusals)  # one a minute per address (earlier tests count)
        from_amqtt = [r for r in caplog.records if r.name.startswith("amqtt") and r.levelno >= 30]
        assert len(from_amqtt) <= 10, [r.getMessage() for r in from_amqtt]
        assert not any(r.exc_info for r in caplog.records if r.name.startswith(("bridge.broker", "amqtt")))


# -- connections that never log in ------------------------------------------------------------------

WS_UPGRADE = (
    b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


def hold(port: int, count: int, source: str = "127.0.0.1", send: bytes = b"") -> list[socket.socket]:
    """`count` connections from `source` that send `send` (nothing, half a CONNECT, a WebSocket
    handshake) and then nothing more."""
    held = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if send:
            with contextlib.suppress(OSError):  # already closed by the broker
                conn.sendall(send)
        held.append(conn)
    return held


def still_open(conns: list[socket.socket], wait: float) -> int:
    """How many of `conns` the broker has not closed after `wait` seconds (the data it sent, a
    WebSocket handshake's answer, is read and ignored)."""
    deadline = time.monotonic() + wait
    open_ = set(conns)
    while open_ and time.monotonic() < deadline:
        for conn in list(open_):
            conn.setblocking(False)
            try:
                while chunk := conn.recv(65536):
                    del chunk
                open_.discard(conn)  # end of stream
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(conn)
        time.sleep(0.05)
    return len(open_)


def test_a_crowd_that_never_logs_in_is_capped_and_keeps_nobody_out(tmp_path: Path) -> None:
    """mallory's host opens hundreds of connections, over TCP and WebSockets, and never sends a
    CONNECT (or only half of one, or never finishes the WebSocket handshake). Each used to be kept
    for 10 s (and re-opened), however many: the broker held every socket. Now at most 32 from her
    address wait, and alice and bob still log in, from elsewhere and from her address."""
    ws = free_port()
    with embedded(tmp_path, ws_listen=("127.0.0.1", ws)) as broker:
        crowd = hold(broker.port, 150)
        crowd += hold(broker.port, 50, send=b"\x10\x7f\x00\x04MQTT")  # half a CONNECT
        crowd += hold(ws, 50, send=WS_UPGRADE[:40])  # half a handshake
        crowd += hold(ws, 50, send=WS_UPGRADE)  # a WebSocket, and no CONNECT in it
        try:
            assert still_open(crowd, 3) <= 32
            assert broker.broker.pending.count("127.0.0.1") <= 32
            for source in ("127.0.0.2", "127.0.0.1"):
                for transport, port in (("tcp", broker.port), ("websockets", ws)):
                    alice = Raw(
                        port,
                        f"alice:{transport}",
                        "alice",
                        ACCOUNTS["alice"],
                        transport=transport,
                        source=source,
                    )
                    assert not alice.refused, (source, transport)
                    alice.stop()
        finally:
            for conn in crowd:
                conn.close()


def test_a_crowd_from_many_addresses_is_capped_in_all(tmp_path: Path) -> None:
    """Twenty addresses each hold 30 (under the 32 of one address): beyond the total of 512 a new
    connection closes the oldest waiting one, so the crowd cannot hold more and a fresh login from
    elsewhere still gets through."""
    with embedded(tmp_path) as broker:
        crowd = [c for i in range(20) for c in hold(broker.port, 30, source=f"127.0.1.{i + 1}")]
        try:
            assert still_open(crowd, 3) <= 512
            assert broker.broker.pending.count() <= 512
            bob = Raw(broker.port, "bob:x", "bob", ACCOUNTS["bob"], source="127.0.0.2")
            assert not bob.refused, f"bob's login: {bob.rc} (None: no answer in 10 s)"
            bob.stop()
        finally:
            for conn in crowd:
                conn.close()


def test_a_websocket_message_larger_than_a_packet_is_refused_before_it_is_kept(tmp_path: Path) -> None:
    """websockets' defaults let an unauthenticated connection queue 16 messages of 1 MiB each."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import ConnectionClosed

    from bridge.broker import MAX_PACKET

    ws = free_port()
    with embedded(tmp_path, ws_listen=("127.0.0.1", ws)) as broker:
        del broker
        with ws_client.connect(f"ws://127.0.0.1:{ws}/mqtt", subprotocols=["mqtt"]) as conn:  # type: ignore[list-item]
            code = None
            try:
                # a CONNECT's first bytes, then far more than any packet in the same message
                conn.send(b"\x10\x7f" + b"\x00" * (2 * MAX_PACKET))
                conn.recv(timeout=5)
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            except TimeoutError:
                pass
            assert code == 1009, code  # message too big


def test_serve_takes_the_caps_of_waiting_connections(tmp_path: Path) -> None:
    import subprocess

    from test_cli import serve_cmd, serving, wait_for_line

    help_text = "".join(subprocess.run(serve_cmd("--help"), capture_output=True, text=True).stdout.split())
    for words in ("--max-pending-per-address", "envCHAT_BRIDGE_MAX_PENDING;default512", "default32"):
        assert words in help_text, words
    bad = subprocess.run(serve_cmd("--max-pending-per-address", "0"), capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-pending-per-address takes a whole number" in bad.stderr
    port, ws = free_port(), free_port()
    args = ("--listen", f"127.0.0.1:{port}", "--ws-listen", f"127.0.0.1:{ws}", "--http-listen", "off")
    args += ("--database-url", f"sqlite:///{tmp_path / 'db.sqlite3'}", "--max-pending-per-address", "3")
    with serving(tmp_path, *args) as proc:
        wait_for_line(proc, "bridge online")
        crowd = hold(port, 6) + hold(ws, 6)
        try:
            assert still_open(crowd, 3) <= 3
        finally:
            for conn in crowd:
                conn.close()


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return bytes([first]) + length + body


def test_qos2_publishes_never_released_are_capped(tmp_path: Path) -> None:
    """mallory, with her own account, sends QoS 2 commands of 100 KiB and never their PUBREL: amqtt
    kept every one in her session (up to 65,535 of them, 6 GiB), also after she left."""
    from bridge.broker import MAX_QOS2_INFLIGHT

    with embedded(tmp_path) as broker:
        conn = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        connect = b"\x00\x04MQTT\x04\xc2\x00\x3c" + _mqtt_string("mallory:q2")
        connect += _mqtt_string("mallory") + _mqtt_string(ACCOUNTS["mallory"])
        conn.sendall(_packet(0x10, connect))
        assert conn.recv(4) == b"\x20\x02\x00\x00"
        topic = _mqtt_string(f"{PREFIX}/users/mallory/commands/get-active-users")
        payload = b'{"request_id":"' + b"a" * 100_000 + b'"}'
        sent = 0
        with contextlib.suppress(OSError):
            for packet_id in range(1, 201):
                conn.sendall(_packet(0x34, topic + packet_id.to_bytes(2, "big") + payload))
                sent += 1
        assert still_open([conn], 5) == 0, f"still open after {sent} QoS 2 publishes"
        conn.close()
        kept = [len(s.inflight_in) for s, _h in broker.broker._sessions.values()]
        assert max(kept, default=0) <= MAX_QOS2_INFLIGHT, kept
        # a client that releases its QoS 2 publishes is served as ever
        bob = Raw(broker.port, "bob:q2", "bob", ACCOUNTS["bob"], subscribe=(f"{PREFIX}/users/bob/inbox",))
        assert bob.subscribed.wait(10)
        for i in range(MAX_QOS2_INFLIGHT + 8):
            bob.client.publish(
                f"{PREFIX}/users/bob/commands/get-active-users", orjson.dumps({"request_id": f"b{i}"}), qos=2
            ).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while len(bob.got) < MAX_QOS2_INFLIGHT + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(bob.got) == MAX_QOS2_INFLIGHT + 8 and not bob.gone.is_set()
        bob.stop()


def test_guessing_from_many_addresses_does_not_stall_the_broker(tmp_path: Path) -> None:
    """Forty addresses guess bob's password, each within its budget (10): every wrong password was
    hashed on the event loop the broker and the bridge share, about 10-30 ms each, so alice, logged
    in all along, waited seconds for her answers."""
    with embedded(tmp_path) as broker:
        alice = user("alice", broker.port)
        alice.connect_chat()
        round_trip(alice)
        stop = threading.Event()

        def guess(source: str) -> None:
            for i in range(10):
                if stop.is_set():
                    return
                Raw(broker.port, f"bob:g{i}", "bob", f"guess-{i}", source=source).stop()

        guessers = [threading.Thread(target=guess, args=(f"127.0.3.{n + 1}",)) for n in range(40)]
        for t in guessers:
            t.start()
        worst = 0.0
        try:
            for _ in range(20):
                start = time.monotonic()
                round_trip(alice)
                worst = max(worst, time.monotonic() - start)
        finally:
            stop.set()
            for t in guessers:
                t.join(30)
        assert worst < 1.0, f"alice waited {worst:.1f} s for an answer"
        alice.stop()


def test_subscribing_to_everything_again_and_again_does_not_stall_the_broker(tmp_path: Path) -> None:
    """With 5,000 presence topics retained, each SUBSCRIBE to `#` made the broker replay all of them
    on the loop it shares with the bridge: 300 of them from mallory's own account and alice waited
    5.8 s for an answer. Now an account's replays are budgeted (bursts of 20,000 messages, then 1,000
    a second) and yield to the others; bob's first subscription still gets every presence topic."""
    import asyncio

    with embedded(tmp_path) as broker:

        async def fill() -> None:
            for i in range(5000):
                await broker.broker.retain_message(None, f"{PREFIX}/presence/u{i}", b'{"status":"online"}', 1)

        alice = user("alice", broker.port)
        alice.connect_chat()
        asyncio.run_coroutine_threadsafe(fill(), broker._loop).result(60)  # type: ignore[arg-type]
        round_trip(alice)
        conn = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        connect = b"\x00\x04MQTT\x04\xc2\x00\x3c" + _mqtt_string("mallory:s")
        conn.sendall(_packet(0x10, connect + _mqtt_string("mallory") + _mqtt_string(ACCOUNTS["mallory"])))
        assert conn.recv(4) == b"\x20\x02\x00\x00"

        def flood() -> None:
            with contextlib.suppress(OSError):
                for i in range(300):
                    conn.sendall(_packet(0x82, (i + 1).to_bytes(2, "big") + _mqtt_string("#") + b"\x00"))

        def drain() -> None:
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass

        threading.Thread(target=drain, daemon=True).start()
        flooder = threading.Thread(target=flood)
        flooder.start()
        worst, start = 0.0, time.monotonic()
        while flooder.is_alive() or time.monotonic() - start < 3:
            sent = time.monotonic()
            round_trip(alice)
            worst = max(worst, time.monotonic() - sent)
        conn.close()
        assert worst < 2.0, f"alice waited {worst:.1f} s for an answer"
        bob = Raw(broker.port, "bob:p", "bob", ACCOUNTS["bob"])
        bob.client.subscribe(f"{PREFIX}/presence/+", 0)  # (QoS 0: 5,000 PUBACKs are not the point)
        deadline = time.monotonic() + 30
        while len(bob.got) < 5000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len({t for t, _ in bob.got}) >= 5000
        bob.stop()
        alice.stop()


def test_a_crowd_of_guesses_from_one_address_leaves_the_hasher_to_the_others(tmp_path: Path) -> None:
    """Thirty wrong passwords sent at once from one address (ten for each of three accounts, within
    its budgets and its 32 connections not logged in) filled the hasher's 16 places, and bob's first login from elsewhere meanwhile was
    refused (CONNACK 3). An address now holds at most 4 of them."""
    with embedded(tmp_path) as broker:
        guesses = []
        for name in ("alice", "mallory", "chat-observer"):
            for i in range(10):
                conn = socket.create_connection(
                    ("127.0.0.1", broker.port), timeout=10, source_address=("127.0.3.1", 0)
                )
                guesses.append((conn, _connect_packet(f"{name}:g{i}", name, f"wrong-{i}")))
        bob = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        for conn, packet in guesses:
            conn.sendall(packet)
        bob.sendall(_connect_packet("bob:first", "bob", ACCOUNTS["bob"]))
        answer = bob.recv(4)
        assert answer == b"\x20\x02\x00\x00", f"bob's first login was answered {answer!r}"
        codes = [conn.recv(4)[3:] for conn, _ in guesses]
        assert codes.count(b"\x03") >= 10  # the address's share taken, the rest told to come back
        for conn, _ in [*guesses, (bob, b"")]:
            conn.close()


def _connect_packet(client_id: str, user: str, password: str) -> bytes:
    body = (
        b"\x00\x04MQTT\x04\xc2\x00\x3c"
        + _mqtt_string(client_id)
        + _mqtt_string(user)
        + _mqtt_string(password)
    )
    return _packet(0x10, body)
