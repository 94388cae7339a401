"""Deployment A as shipped (mosquitto/mosquitto.conf, mosquitto/acl and the plugin it loads), attacked
by an ordinary account: client ids bound to accounts, no retained commands, only known command names,
caps on connections and persistent sessions, throttled password guessing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from chatclient import ChatClient
from conftest import (
    ACCOUNTS,
    ROOT,
    Mosquitto,
    flood_guard,
    mosquitto_available,
    running_bridge,
    write_accounts,
)
from paho.mqtt.enums import CallbackAPIVersion

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="the mosquitto binary is not installed")

BRIDGE = f"chat-bridge:{ACCOUNTS['chat-bridge']}"


@contextmanager
def shipped(tmp_path: Path, extra: tuple[str, ...] = (), **options: str) -> Iterator[Mosquitto]:
    """Mosquitto from the shipped config on free ports; `options` override its lines (e.g. plugin_opt_*)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    passwd = str(write_accounts(tmp_path / "passwd"))
    broker = Mosquitto(
        tmp_path,
        ROOT / "mosquitto" / "mosquitto.conf",
        {
            "plugin": str(flood_guard()),
            "plugin_opt_password_file": passwd,
            "password_file": passwd,  # (a config without the plugin's accounts)
            "acl_file": str(ROOT / "mosquitto" / "acl"),
            "persistence_location": f"{data}/",
            **options,
        },
        extra,
    ).start()
    try:
        yield broker
    finally:
        broker.stop()


class Raw:
    """A paho client with any username, password and client id; records what it receives."""

    def __init__(
        self,
        port: int,
        username: str | None,
        client_id: str,
        *,
        password: str | None = None,
        clean_session: bool = True,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 30,
        inflight: int = 20,
    ) -> None:
        self.got: list[paho.MQTTMessage] = []
        self.arrived = threading.Condition()
        self.result: Any = None
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, ACCOUNTS.get(username) if password is None else password)
        self.client.max_inflight_messages_set(inflight)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError(f"{client_id}: no CONNACK")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if self.result is None:
            self.result = rc
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.arrived:
            self.got.append(msg)
            self.arrived.notify_all()

    @property
    def accepted(self) -> bool:
        return self.result is not None and not self.result.is_failure

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(10)

    def wait_for(self, match: Callable[[paho.MQTTMessage], bool], timeout: float = 10) -> paho.MQTTMessage:
        """The first message received that matches, waiting for it; each message is looked at once."""
        checked = 0
        found: list[paho.MQTTMessage] = []

        def arrived() -> bool:
            nonlocal checked
            while not found and checked < len(self.got):
                if match(self.got[checked]):
                    found.append(self.got[checked])
                checked += 1
            return bool(found)

        with self.arrived:
            assert self.arrived.wait_for(arrived, timeout), [(m.topic, m.payload[:80]) for m in self.got]
            return found[0]

    def close(self) -> None:
        """Disconnects cleanly (no will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Dies without DISCONNECT: the broker publishes the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def accepted(port: int, username: str | None, client_id: str, **kw: Any) -> bool:
    raw = Raw(port, username, client_id, **kw)
    ok = raw.accepted
    raw.close()
    return ok


def eventually(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Polls a condition that depends on the broker having processed another connection's close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def user(name: str, port: int, **kw: Any) -> ChatClient:
    return ChatClient(name, "127.0.0.1", port, username=name, password=ACCOUNTS[name], **kw).start()


def test_nobody_can_use_another_accounts_client_id(tmp_path: Path) -> None:
    with shipped(tmp_path) as broker, running_bridge(broker.port, f"sqlite:///{tmp_path / 'c.db'}", BRIDGE):
        port = broker.port
        alice = user("alice", port)
        alice.connect_chat()
        epoch = alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online")["epoch"]
        # bob's phone keeps a persistent session; he goes offline; alice writes to him
        bob = user("bob", port)
        bob.connect_chat()
        bob.stop()
        bob_phone = Raw(port, "bob", "bob:phone", clean_session=False)
        assert bob_phone.accepted
        bob_phone.subscribe("chat/v1/users/bob/inbox")
        bob_phone.close()
        cid = alice.request("create-conversation", kind="direct", participants=["bob"])["data"][
            "conversation"
        ]["conversation_id"]
        for i in range(3):
            alice.request("send-message", conversation_id=cid, body=f"queued {i}")

        # mallory, with her own password, tries the bridge's and bob's client ids, repeatedly
        for _ in range(3):
            for client_id in ("chat-bridge", "chat-bridge:worker", "bob", "bob:phone", "bob:laptop"):
                for clean in (True, False):
                    assert not accepted(port, "mallory", client_id, clean_session=clean), client_id
        # ids that do not follow the rule, even for herself
        for client_id in (
            "",
            "mallory:",
            "mallory:" + "x" * 65,
            "mallory:a/b",
            "mallory:a b",
            "mallorybob",
            "Mallory",
        ):
            assert not accepted(port, "mallory", client_id), client_id
        assert not accepted(port, None, "mallory")  # anonymous
        for client_id in (
            "mallory",
            "mallory:phone",
            "mallory:web-3f9a",
            "mallory:" + "x" * 64,
            "mallory:a.b_c-D",
        ):
            assert accepted(port, "mallory", client_id), client_id

        # the bridge never lost its connection: same epoch, still answering
        assert alice.request("send-message", conversation_id=cid, body="after")["type"] == "message-added"
        assert alice.retained["chat/v1/bridge/status"] == {
            "status": "online",
            "epoch": epoch,
            "since": alice.retained["chat/v1/bridge/status"]["since"],
        }
        assert not any("already connected" in line for line in broker.log), broker.log
        # bob's queued messages are all still there for bob's phone
        bob_phone = Raw(port, "bob", "bob:phone", clean_session=False)
        bodies = ["queued 0", "queued 1", "queued 2", "after"]
        bob_phone.wait_for(lambda m: b'"after"' in m.payload)
        got = [orjson.loads(m.payload) for m in bob_phone.got]
        assert [e["data"]["message"]["body"] for e in got if e["type"] == "message-added"] == bodies
        bob_phone.close()
        alice.stop()


def test_no_retained_commands_and_only_known_command_names(tmp_path: Path) -> None:
    with shipped(tmp_path) as broker, running_bridge(broker.port, f"sqlite:///{tmp_path / 'c.db'}", BRIDGE):
        port = broker.port
        alice = user("alice", port)
        alice.connect_chat()
        big = orjson.dumps({"conversation_id": "global", "body": "kept forever", "pad": "x" * 60_000})
        stuffer = Raw(port, "alice", "alice:stuffer")
        for i in range(5):
            stuffer.client.publish(
                "chat/v1/users/alice/commands/send-message", big, qos=1, retain=True
            ).wait_for_publish(10)
            stuffer.client.publish(
                f"chat/v1/users/alice/commands/x{i}", big, qos=1, retain=True
            ).wait_for_publish(10)
        # a retained will on her own disconnect command
        Raw(
            port,
            "alice",
            "alice:will",
            will=("chat/v1/users/alice/commands/disconnect", b'{"session_id":"w"}', True),
        ).drop()
        # what the bridge's account finds retained under commands: nothing (bridge/status, subscribed
        # last in the same SUBSCRIBE, proves every retained message has been delivered)
        probe = Raw(port, "chat-bridge", "chat-bridge:probe")
        probe.subscribe("chat/v1/users/+/commands/#", "chat/v1/bridge/status")
        probe.wait_for(lambda m: m.topic == "chat/v1/bridge/status")
        assert [m.topic for m in probe.got if m.retain and "/commands/" in m.topic] == []
        # and none of them was applied
        messages = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
        assert [m["body"] for m in messages] == []

        # unknown command names never reach the bridge; known ones do (same publisher: in order)
        for name in ("x", "send-message/extra", "connect2", "GET-MESSAGES"):
            stuffer.client.publish(f"chat/v1/users/alice/commands/{name}", b"{}", qos=1).wait_for_publish(10)
        stuffer.client.publish(
            "chat/v1/users/alice/commands/get-active-users", b"{}", qos=1
        ).wait_for_publish(10)
        probe.wait_for(lambda m: m.topic.endswith("/get-active-users") and m.payload == b"{}")
        names = {m.topic.split("/commands/", 1)[1] for m in probe.got if "/commands/" in m.topic}
        assert names == {"get-messages", "get-active-users"}  # alice's request, and ours: no unknown name
        assert any("refused a retained command from alice" in line for line in broker.log)
        stuffer.close()
        probe.close()
        alice.stop()


def test_notifications_are_for_the_push_gateway_only(tmp_path: Path) -> None:
    with shipped(tmp_path) as broker:
        port = broker.port
        gateway = Raw(port, "chat-push", "chat-push")
        gateway.subscribe("chat/v1/notifications/+")
        mallory = Raw(port, "mallory", "mallory:spy")
        mallory.subscribe("chat/v1/notifications/+", "chat/v1/notifications/bob", "chat/v1/presence/+")
        bridge = Raw(port, "chat-bridge", "chat-bridge")
        bridge.client.publish(
            "chat/v1/notifications/bob", b'{"type":"notification"}', qos=1
        ).wait_for_publish(10)
        bridge.client.publish("chat/v1/presence/marker", b"{}", qos=1).wait_for_publish(10)
        gateway.wait_for(lambda m: m.topic == "chat/v1/notifications/bob")
        mallory.wait_for(lambda m: m.topic == "chat/v1/presence/marker")  # what came before has been routed
        assert [m.topic for m in mallory.got] == ["chat/v1/presence/marker"]
        # and nobody but the bridge publishes notifications
        mallory.client.publish(
            "chat/v1/notifications/bob", b'{"type":"notification","forged":1}', qos=1
        ).wait_for_publish(10)
        bridge.client.publish(
            "chat/v1/notifications/bob", b'{"type":"notification","n":2}', qos=1
        ).wait_for_publish(10)
        gateway.wait_for(lambda m: b'"n":2' in m.payload)
        assert not any(b"forged" in m.payload for m in gateway.got)
        for c in (gateway, mallory, bridge):
            c.close()


def test_caps_on_connections_and_persistent_sessions_per_account(tmp_path: Path) -> None:
    options = {
        "plugin_opt_max_connections": "4",
        "plugin_opt_max_sessions": "2",
        "plugin_opt_session_expiry": "2",
    }
    with shipped(tmp_path, **options) as broker:
        port = broker.port
        conns = [Raw(port, "mallory", f"mallory:c{i}") for i in range(4)]
        assert all(c.accepted for c in conns)
        assert not accepted(port, "mallory", "mallory:c4")
        assert not accepted(port, "mallory", "mallory")
        assert accepted(port, "alice", "alice")  # only mallory is capped
        # taking over one's own connection replaces it: allowed at the cap
        conns[0].client.loop_stop()  # (no reconnect of the old one)
        takeover = Raw(port, "mallory", "mallory:c0")
        assert takeover.accepted
        conns[1].close()
        assert eventually(lambda: accepted(port, "mallory", "mallory:c5"))
        for c in (takeover, *conns[2:]):
            c.close()

        # persistent sessions: two, counted while offline; reusing one is fine
        for name in ("s0", "s1"):
            assert accepted(port, "mallory", f"mallory:{name}", clean_session=False)
        assert not accepted(port, "mallory", "mallory:s2", clean_session=False)
        assert accepted(port, "mallory", "mallory:s2")  # a clean session is not capped here
        assert accepted(port, "mallory", "mallory:s0", clean_session=False)
        # the bridge's account is exempt
        bridges = [Raw(port, "chat-bridge", f"chat-bridge:w{i}", clean_session=False) for i in range(6)]
        assert all(b.accepted for b in bridges)
        for b in bridges:
            b.close()
        # a clean session deletes a stored one; offline sessions expire (session_expiry 2 s here)
        assert accepted(port, "mallory", "mallory:s1")
        assert accepted(port, "mallory", "mallory:s3", clean_session=False)
        assert not accepted(port, "mallory", "mallory:s4", clean_session=False)
        assert eventually(lambda: accepted(port, "mallory", "mallory:s4", clean_session=False), timeout=15)
        assert any("too many persistent sessions" in line for line in broker.log)
        assert any("too many connections" in line for line in broker.log)


def test_password_guessing_is_throttled_per_address(tmp_path: Path) -> None:
    with shipped(tmp_path, plugin_opt_auth_failures="5", plugin_opt_auth_refill="12") as broker:
        port = broker.port
        assert accepted(port, "bob", "bob")
        for guess in range(5):
            assert not accepted(port, "bob", "bob", password=f"guess-{guess}")
        # locked out: even the right password is refused, unchecked, from this address
        assert not accepted(port, "bob", "bob")
        assert not accepted(port, "alice", "alice")
        assert any("refusing logins from 127.0.0.1" in line for line in broker.log)
        # one more attempt per refill period
        assert eventually(lambda: accepted(port, "bob", "bob"), timeout=30)
        assert not accepted(port, "nobody", "nobody", password="x")
        assert not accepted(port, "alice", "alice:x", password="")


def test_the_plugin_rereads_the_password_file_when_it_changes(tmp_path: Path) -> None:
    from bridge import passwords

    with shipped(tmp_path) as broker:
        path = tmp_path / "passwd"
        assert not accepted(broker.port, "carol", "carol", password="carol-pw-1")
        entries = passwords.read(path)
        entries["carol"] = passwords.hash_password("carol-pw-1")
        passwords.write(path, entries)
        assert accepted(broker.port, "carol", "carol", password="carol-pw-1")
        entries["carol"] = passwords.hash_password("carol-pw-2")
        passwords.write(path, entries)
        assert not accepted(broker.port, "carol", "carol", password="carol-pw-1")  # no stale cache
        assert accepted(broker.port, "carol", "carol:phone", password="carol-pw-2")
        del entries["carol"]
        passwords.write(path, entries)
        assert not accepted(broker.port, "carol", "carol", password="carol-pw-2")


def test_keepalive_must_be_bounded(tmp_path: Path) -> None:
    with shipped(tmp_path) as broker:
        assert not accepted(broker.port, "mallory", "mallory", keepalive=0)  # never: online forever
        assert not accepted(broker.port, "mallory", "mallory", keepalive=301)
        assert accepted(broker.port, "mallory", "mallory", keepalive=300)
        assert accepted(broker.port, "mallory", "mallory", keepalive=1)


def publish_many(client: paho.Client, topic: str, count: int, payload: Callable[[int], bytes]) -> None:
    infos = [client.publish(topic, payload(i), qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)


def test_the_bridges_queue_holds_a_long_outage(tmp_path: Path) -> None:
    """12,000 commands while the bridge's session is offline: all of them wait for it (not 10,000)."""
    with shipped(tmp_path, plugin_opt_rate="1000000", plugin_opt_burst="1000000") as broker:
        port = broker.port
        bridge = Raw(port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.subscribe("chat/v1/users/+/commands/#")
        bridge.close()
        alice = Raw(port, "alice", "alice:flood", inflight=1000)
        publish_many(
            alice.client, "chat/v1/users/alice/commands/send-message", 12_000, lambda i: b'{"n":%d}' % i
        )
        alice.close()
        bridge = Raw(port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.wait_for(lambda m: m.payload == b'{"n":11999}', timeout=60)
        assert [orjson.loads(m.payload)["n"] for m in bridge.got] == list(range(12_000))
        bridge.close()
        assert not any("being dropped" in line for line in broker.log)


def test_drops_from_a_full_queue_are_logged_and_counted(tmp_path: Path) -> None:
    with shipped(tmp_path, extra=("sys_interval 1",), max_queued_bytes="20000") as broker:
        port = broker.port
        bridge = Raw(port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.subscribe("chat/v1/users/+/commands/#")
        bridge.close()
        alice = Raw(port, "alice", "alice:flood")
        publish_many(alice.client, "chat/v1/users/alice/commands/send-message", 300, lambda i: b"x" * 200)
        alice.close()
        bridge = Raw(port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.subscribe("$SYS/broker/publish/messages/dropped")
        counted = bridge.wait_for(lambda m: m.topic.startswith("$SYS") and int(m.payload) > 0)
        assert int(counted.payload) >= 300 - 20000 // 200 - 100  # (the in-flight window is not queued)
        assert any(
            "Outgoing messages are being dropped for client chat-bridge." in line for line in broker.log
        )
        bridge.close()


def test_an_offline_users_session_is_queued_a_bounded_number_of_messages(tmp_path: Path) -> None:
    with shipped(tmp_path, plugin_opt_offline_queue="5") as broker:
        port = broker.port
        phone = Raw(port, "bob", "bob:phone", clean_session=False)
        phone.subscribe("chat/v1/users/bob/inbox")
        phone.close()
        bridge = Raw(port, "chat-bridge", "chat-bridge")
        publish_many(bridge.client, "chat/v1/users/bob/inbox", 50, lambda i: b'{"n":%d}' % i)
        phone = Raw(port, "bob", "bob:phone", clean_session=False)
        phone.wait_for(lambda m: m.payload == b'{"n":4}')
        # online again: everything new arrives (the last one proves what came before was routed)
        bridge.client.publish("chat/v1/users/bob/inbox", b'{"n":"live"}', qos=1).wait_for_publish(10)
        phone.wait_for(lambda m: m.payload == b'{"n":"live"}')
        assert [orjson.loads(m.payload)["n"] for m in phone.got] == [0, 1, 2, 3, 4, "live"]
        assert any("offline session bob:phone of bob holds 5 messages" in line for line in broker.log)
        phone.close()
        bridge.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_websockets_listener_binds_only_its_address(tmp_path: Path) -> None:
    with shipped(tmp_path) as broker:  # both listeners rewritten to 127.0.0.1 and free ports
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
        assert listening_addresses(broker.port) and listening_addresses(broker.port) <= loopback
        assert listening_addresses(broker.ws_port), "no websockets listener"
        assert listening_addresses(broker.ws_port) <= loopback, listening_addresses(broker.ws_port)


def test_a_tls_listener_as_documented(tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    from conftest import free_port

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    # a throwaway CA and a server certificate for 127.0.0.1 signed by it
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    tls_port = free_port()
    tls = (
        f"listener {tls_port} 127.0.0.1",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        "tls_version tlsv1.2",
    )
    with shipped(tmp_path, extra=tls) as broker:
        secure = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:tls")
        secure.tls_set(ca_certs=str(tmp_path / "ca.crt"))
        secure.username_pw_set("alice", ACCOUNTS["alice"])
        got = threading.Event()
        secure.on_connect = lambda _c, _u, _f, rc, _p: (
            rc.is_failure or secure.subscribe("chat/v1/presence/+", 1)
        )
        secure.on_subscribe = lambda *a: secure.publish(
            "chat/v1/users/alice/commands/get-active-users", b"{}", 1
        )
        secure.on_publish = lambda *a: got.set()
        secure.connect("127.0.0.1", tls_port)
        secure.loop_start()
        assert got.wait(10)
        secure.disconnect()
        secure.loop_stop()
        # the same rules apply on it, and nobody gets in without checking the certificate or in plain text
        bad = paho.Client(CallbackAPIVersion.VERSION2, client_id="mallory:tls")
        bad.tls_set(cert_reqs=ssl.CERT_REQUIRED)  # the system CAs do not know the throwaway CA
        with pytest.raises(ssl.SSLError):
            bad.connect("127.0.0.1", tls_port)
        assert not accepted(tls_port, "alice", "alice")  # plain MQTT on the TLS port: no CONNACK
        assert any(f"Opening ipv4 listen socket on port {tls_port}" in line for line in broker.log)


def test_the_persistence_directory_ships_and_a_restart_keeps_retained_and_queued(tmp_path: Path) -> None:
    """Mosquitto from a copy of the repository's mosquitto/ as a clone has it, with the shipped
    relative paths: retained presence and the bridge's queued commands survive a restart."""
    import shutil
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "mosquitto"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "mosquitto/data/.gitignore" in tracked
    for name in tracked:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(flood_guard(), tmp_path / "mosquitto/plugins/chat_flood_guard.so")
    write_accounts(tmp_path / "mosquitto/passwd")
    broker = Mosquitto(tmp_path, tmp_path / "mosquitto/mosquitto.conf", cwd=tmp_path).start()
    try:
        bridge = Raw(broker.port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.subscribe("chat/v1/users/+/commands/#")
        bridge.client.publish(
            "chat/v1/presence/alice", b'{"status":"online"}', qos=1, retain=True
        ).wait_for_publish(10)
        bridge.close()
        alice = Raw(broker.port, "alice", "alice")
        for i in range(3):
            alice.client.publish(
                "chat/v1/users/alice/commands/get-active-users", b'{"n":%d}' % i, qos=1
            ).wait_for_publish(10)
        alice.close()
    finally:
        broker.stop()
    assert (tmp_path / "mosquitto/data/mosquitto.db").exists()
    broker.start()
    try:
        bridge = Raw(broker.port, "chat-bridge", "chat-bridge", clean_session=False)
        bridge.wait_for(lambda m: m.payload == b'{"n":2}')
        assert [m.payload for m in bridge.got] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        bridge.subscribe("chat/v1/presence/+")
        assert bridge.wait_for(lambda m: m.topic == "chat/v1/presence/alice").retain
        bridge.close()
    finally:
        broker.stop()


def acl_rule_lines(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def test_mosquitto_acl_says_what_bridge_topics_says() -> None:
    from bridge.topics import Topics

    lines = acl_rule_lines(ROOT / "mosquitto" / "acl")
    assert lines == Topics().mosquitto_acl()  # Mosquitto's drop counter for the bridge included
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    assert f"plugin_opt_prefix {Topics().prefix}\n" in conf


def test_the_plugin_applies_the_client_id_rule_of_bridge_topics(tmp_path: Path) -> None:
    from bridge.topics import client_id_allowed

    candidates = [
        "mallory",
        "mallory:phone",
        "mallory:a.b_c-D",
        "mallory:" + "x" * 64,
        "mallory:" + "x" * 65,
        "mallory:",
        "mallory::x",
        "mallory:a:b",
        "mallory:a/b",
        "mallory:é",
        "mallory:a b",
        "mallory\n",
        "mallorybob",
        "MALLORY",
        "bob",
        "bob:mallory",
        "chat-bridge",
        "chat-bridge:mallory",
        "",
    ]
    with shipped(tmp_path) as broker:
        for client_id in candidates:
            assert accepted(broker.port, "mallory", client_id) == client_id_allowed("mallory", client_id), (
                client_id
            )
        assert accepted(broker.port, "chat-bridge", "chat-bridge:w1") == client_id_allowed(
            "chat-bridge", "chat-bridge:w1"
        )


def test_the_plugin_refuses_retained_publishes_where_bridge_topics_does(tmp_path: Path) -> None:
    """Every topic that bridge/topics.py refuses retained is refused by Mosquitto; what it allows
    retained (the bridge's presence and status) is kept."""
    from bridge.topics import COMMAND_NAMES, Topics

    topics = Topics()
    with shipped(tmp_path) as broker:
        alice = Raw(broker.port, "alice", "alice:r")
        for name in COMMAND_NAMES:
            topic = topics.command("alice", name)
            assert not topics.allows("alice", topic, "publish", retain=True)
            assert topics.allows("alice", topic, "publish")
            alice.client.publish(topic, b"{}", qos=1, retain=True).wait_for_publish(10)
        alice.close()
        bridge = Raw(broker.port, "chat-bridge", "chat-bridge:r")
        for topic in (topics.presence("alice"), topics.status):
            assert topics.allows("chat-bridge", topic, "publish", retain=True)
            bridge.client.publish(topic, b'{"kept":1}', qos=1, retain=True).wait_for_publish(10)
        bridge.subscribe("chat/v1/users/+/commands/#", topics.presence("alice"), topics.status)
        bridge.wait_for(lambda m: m.topic == topics.status)
        assert sorted(m.topic for m in bridge.got if m.retain) == sorted(
            [topics.presence("alice"), topics.status]
        )
        bridge.close()
