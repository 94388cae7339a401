"""The SDK's paho client keeps QoS 1 publishes in order across a reconnect, against a scripted broker
on loopback: the broker drops the connection with publishes unacknowledged, and the application
publishes again while the client reconnects (paho 2.2 sent those first)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge import mqtt_codec as c
from chat_bridge._paho import OrderedClient

WAIT = 10.0


class ScriptedBroker:
    """One connection at a time. `connections` gets each CONNECT as it arrives; the test says when
    to answer it (`answer`). PUBLISHes are recorded and acknowledged while `acknowledge` is set."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connects: queue.Queue[socket.socket] = queue.Queue()
        self.publishes: list[c.Publish] = []
        self.changed = threading.Condition()
        self.acknowledge = threading.Event()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        decoder = c.Decoder(from_server=False)
        try:
            while data := sock.recv(65536):
                for packet in decoder.feed(data):
                    if isinstance(packet, c.Connect):
                        self.connects.put(sock)
                    elif isinstance(packet, c.Publish):
                        with self.changed:
                            self.publishes.append(packet)
                            self.changed.notify_all()
                        if self.acknowledge.is_set():
                            sock.sendall(c.encode_puback(packet.packet_id))
                    elif isinstance(packet, c.Subscribe):
                        granted = [q for _, q in packet.topics]
                        sock.sendall(c.encode_suback(c.Suback(packet.packet_id, granted)))
                    elif isinstance(packet, c.Pingreq):
                        sock.sendall(c.PINGRESP_PACKET)
        except OSError:
            pass

    def next_connect(self) -> socket.socket:
        return self.connects.get(timeout=WAIT)

    def drop(self) -> None:
        """Closes every connection, without a word (the broker's node died)."""
        dropped, self.open = self.open, []
        for sock in dropped:
            with contextlib.suppress(OSError):  # (the client may have closed it already)
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def answer(sock: socket.socket, session_present: bool) -> None:
        sock.sendall(c.encode_connack(c.Connack(session_present, 0)))

    def until(self, check: Callable[[list[c.Publish]], bool]) -> list[c.Publish]:
        with self.changed:
            if not self.changed.wait_for(lambda: check(self.publishes), WAIT):
                raise TimeoutError(f"the broker got {[p.payload for p in self.publishes]}")
            return list(self.publishes)

    def close(self) -> None:
        self.drop()
        self.listener.close()


def bodies(publishes: list[c.Publish]) -> list[bytes]:
    """Each payload once, in the order it first arrived (a resend is the same message again)."""
    seen: list[bytes] = []
    for p in publishes:
        if p.payload not in seen:
            seen.append(p.payload)
    return seen


def make(kind: type[paho.Client], port: int, window: int) -> paho.Client:
    client = kind(CallbackAPIVersion.VERSION2, client_id="alice:phone", clean_session=False)
    client.max_inflight_messages_set(window)
    client.reconnect_delay_set(0, 1)
    client.connect_async("127.0.0.1", port, keepalive=30)
    return client


def send(client: paho.Client, numbers: range) -> list[paho.MQTTMessageInfo]:
    return [client.publish("chat/v1/users/alice/commands/send-message", b"m%d" % i, qos=1) for i in numbers]


@pytest.mark.parametrize("window", [0, 2, 20])
def test_a_publish_made_while_reconnecting_goes_after_the_earlier_ones(window: int) -> None:
    broker = ScriptedBroker()
    client = make(OrderedClient, broker.port, window)
    try:
        client.loop_start()
        broker.answer(broker.next_connect(), False)
        infos = send(client, range(5))
        first = len(broker.until(lambda got: len(got) == (min(window, 5) or 5)))
        broker.drop()  # with all of them unacknowledged
        again = broker.next_connect()  # the client's CONNECT is in, the CONNACK not yet sent
        infos += send(client, range(5, 7))
        broker.acknowledge.set()
        broker.answer(again, True)
        got = broker.until(lambda got: len(bodies(got[first:])) == 7)
        assert bodies(got[first:]) == [b"m%d" % i for i in range(7)]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
        broker.close()


def test_a_publish_made_by_on_connect_goes_after_the_earlier_ones() -> None:
    broker = ScriptedBroker()
    client = make(OrderedClient, broker.port, 20)
    connects: list[int] = []

    def on_connect(c: paho.Client, *_a: object) -> None:
        connects.append(1)
        if len(connects) == 2:  # a session announcing itself again after a reconnect
            c.publish("chat/v1/users/alice/commands/hello", b"hello", qos=1)

    client.on_connect = on_connect
    try:
        client.loop_start()
        broker.answer(broker.next_connect(), False)
        send(client, range(3))
        first = len(broker.until(lambda got: len(got) == 3))
        broker.drop()
        broker.acknowledge.set()
        broker.answer(broker.next_connect(), True)
        got = broker.until(lambda got: len(bodies(got[first:])) == 4)
        assert bodies(got[first:]) == [b"m0", b"m1", b"m2", b"hello"]
    finally:
        client.disconnect()
        client.loop_stop()
        broker.close()
