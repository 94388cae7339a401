"""What a client publishes to the embedded broker just before it leaves: every publish the broker
has read reaches the subscribers, in order, and a will comes after them."""

from __future__ import annotations

import socket
from pathlib import Path

import orjson
from conftest import EmbeddedBroker
from test_embedded_delivery import Subscriber

from bridge.mqtt_codec import DISCONNECT_PACKET, Connect, Will, encode_connect, encode_publish, topic_bytes

COUNT = 200


def burst(port: int, *, will: Will | None, disconnect: bool) -> None:
    """CONNECT, then in one write COUNT QoS 1 publishes numbered 0.. and a DISCONNECT, or (not
    `disconnect`) the publishes alone and, once all are acknowledged, a dropped connection."""
    topic = topic_bytes("out/n")
    publishes = b"".join(encode_publish(topic, orjson.dumps({"n": n}), 1, packet_id=n + 1) for n in range(COUNT))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(encode_connect(Connect("sender", keepalive=60, clean_session=True, will=will)))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        if disconnect:
            sock.sendall(publishes + DISCONNECT_PACKET)
            while sock.recv(65536):  # the PUBACKs, until the broker closes
                pass
            return
        sock.sendall(publishes)
        acks = b""
        while len(acks) < 4 * COUNT:  # PUBACKs: 4 bytes each
            chunk = sock.recv(65536)
            assert chunk, "closed before every PUBACK"
            acks += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_publishes_just_before_a_disconnect_all_reach_the_subscribers(tmp_path: Path) -> None:
    broker = EmbeddedBroker(topic_rules=False).start()
    try:
        watcher = Subscriber(broker.port, "watcher", "alice", "out/#")
        burst(broker.port, will=None, disconnect=True)
        got = watcher.wait_for(COUNT)
        assert [orjson.loads(p.payload)["n"] for p in got] == list(range(COUNT))
    finally:
        broker.stop()


def test_a_will_comes_after_the_publishes_sent_before_the_connection_dropped(tmp_path: Path) -> None:
    broker = EmbeddedBroker(topic_rules=False).start()
    try:
        watcher = Subscriber(broker.port, "watcher", "alice", "out/#")
        burst(broker.port, will=Will("out/will", b'{"n": "will"}'), disconnect=False)
        got = watcher.wait_for(COUNT + 1)
        assert [orjson.loads(p.payload)["n"] for p in got] == [*range(COUNT), "will"]
    finally:
        broker.stop()
