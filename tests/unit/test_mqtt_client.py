"""The MQTT client against a scripted fake broker on loopback: what goes on the wire, and what the
client does with a broker that misbehaves (malformed packets, no PINGRESP, unsolicited answers)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from bridge import mqtt_codec as c
from bridge.mqtt_client import Client, ConnectionRefused, Message, NotConnected, PacketTooLarge

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 10) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


class FakeBroker:
    """Accepts connections, records every packet from the client, answers as `script` says."""

    def __init__(self, *, connack: int = 0, puback: bool = True, pingresp: bool = True) -> None:
        self.connack, self.puback, self.pingresp = connack, puback, pingresp
        self.packets: list[c.Packet] = []  # from the client, all connections
        self.connections: list[asyncio.StreamWriter] = []
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        decoder = c.Decoder(from_server=False)
        while data := await reader.read(65536):
            for packet in decoder.feed(data):
                self.packets.append(packet)
                self.changed.set()
                if isinstance(packet, c.Connect):
                    writer.write(c.encode_connack(c.Connack(False, self.connack)))
                elif isinstance(packet, c.Publish) and packet.qos and self.puback:
                    writer.write(c.encode_puback(packet.packet_id))
                elif isinstance(packet, c.Subscribe):
                    writer.write(c.encode_suback(c.Suback(packet.packet_id, [q for _, q in packet.topics])))
                elif isinstance(packet, c.Pingreq) and self.pingresp:
                    writer.write(c.PINGRESP_PACKET)
        writer.close()

    def send(self, data: bytes) -> None:
        self.connections[-1].write(data)

    def of(self, kind: type[c.Packet]) -> list[c.Packet]:
        return [p for p in self.packets if isinstance(p, kind)]

    async def until(self, check: Callable[[], bool], timeout: float = 5) -> None:
        async def wait() -> None:
            while not check():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def stop(self) -> None:
        assert self.server is not None
        for w in self.connections:
            w.close()
        self.server.close()


def client(broker: FakeBroker, **kw: object) -> Client:
    return Client("127.0.0.1", broker.port, client_id="t", reconnect_min=0.01, reconnect_max=0.05, **kw)  # type: ignore[arg-type]


def test_connect_packet_and_tcp_nodelay() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        will = c.Will("s", b"off", 1, True)
        cl = client(broker, keepalive=7, will=will, username="u", password="p")
        assert await cl.connect() is False
        assert broker.packets[0] == c.Connect("t", 7, False, will, "u", b"p")
        assert cl._conn is not None and cl._conn.transport is not None
        sock = cl._conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await cl.stop()
        await broker.until(lambda: bool(broker.of(c.Disconnect)))
        await broker.stop()

    run(scenario())


def test_refused_connection_raises() -> None:
    async def scenario() -> None:
        broker = await FakeBroker(connack=5).start()
        with pytest.raises(ConnectionRefused) as refused:
            await client(broker).connect()
        assert refused.value.code == 5
        await broker.stop()

    run(scenario())


def test_pubacks_leave_in_the_order_the_publishes_arrived() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        got: list[Message] = []
        cl = client(broker, on_message=got.append)
        await cl.connect()
        broker.send(b"".join(c.encode_publish(b"a", b"%d" % i, 1, packet_id=10 + i) for i in range(4)))
        while len(got) < 4:
            await asyncio.sleep(0.01)
        cl.ack(got[3])
        cl.ack(got[2])
        cl.ack(got[1])
        await cl.subscribe([("x", 1)])  # a round trip: anything sent before it has arrived
        assert broker.of(c.Puback) == []  # all wait behind the first
        cl.ack(got[0])
        await broker.until(lambda: len(broker.of(c.Puback)) == 4)
        assert broker.of(c.Puback) == [c.Puback(10), c.Puback(11), c.Puback(12), c.Puback(13)]
        cl.ack(got[0])  # twice: nothing more
        await cl.subscribe([("y", 1)])
        assert len(broker.of(c.Puback)) == 4
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_the_window_bounds_publishes_in_flight() -> None:
    async def scenario() -> None:
        broker = await FakeBroker(puback=False).start()
        cl = client(broker, window=3)
        await cl.connect()
        futures = [cl.publish("t", b"%d" % i) for i in range(10)]
        await broker.until(lambda: len(broker.of(c.Publish)) == 3)
        assert cl.in_flight == 3 and cl.queued == 7
        first = broker.of(c.Publish)[0]
        assert isinstance(first, c.Publish)
        broker.send(c.encode_puback(first.packet_id))
        await futures[0]
        await broker.until(lambda: len(broker.of(c.Publish)) == 4)
        assert not futures[1].done()
        for p in broker.of(c.Publish)[1:]:
            assert isinstance(p, c.Publish)
            broker.send(c.encode_puback(p.packet_id))
        broker.puback = True
        await asyncio.gather(*futures)
        assert [p.payload for p in broker.of(c.Publish) if isinstance(p, c.Publish)] == [
            b"%d" % i for i in range(10)
        ]
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_pubacks_in_any_order_complete_the_right_publish() -> None:
    async def scenario() -> None:
        broker = await FakeBroker(puback=False).start()
        cl = client(broker)
        await cl.connect()
        futures = [cl.publish("t", b"%d" % i) for i in range(3)]
        await broker.until(lambda: len(broker.of(c.Publish)) == 3)
        pids = [p.packet_id for p in broker.of(c.Publish) if isinstance(p, c.Publish)]
        broker.send(c.encode_puback(pids[2]))
        await futures[2]
        assert not futures[0].done() and not futures[1].done()
        broker.send(c.encode_puback(9999))  # unknown: ignored
        broker.send(c.encode_puback(pids[0]) + c.encode_puback(pids[1]))
        await asyncio.gather(*futures)
        assert cl.stats.connections == 1
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_too_large_publish_fails_at_once_and_sends_nothing() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        cl = client(broker, max_packet_size=100)
        await cl.connect()
        big = cl.publish("t", b"x" * 95)  # 1 + 1 + 2 + 1 + 2 + 95 = 102 bytes
        assert big.done() and isinstance(big.exception(), PacketTooLarge)
        await cl.publish("t", b"x" * 93)  # exactly 100
        assert [len(p.payload) for p in broker.of(c.Publish) if isinstance(p, c.Publish)] == [93]
        await cl.stop()
        await broker.stop()

    run(scenario())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x30\xff\xff\xff\xff\x01",  # remaining length over four bytes
        b"\xf0\x00",  # unknown packet type
        b"\x40\x03\x00\x01\x00",  # PUBACK of the wrong length
        b"\x90\x03\x00\x07\x01",  # SUBACK nobody asked for
        b"\x20\x02\x00\x00",  # a second CONNACK
        b"\x34\x05\x00\x01a\x00\x01",  # QoS 2
    ],
)
def test_malformed_broker_input_drops_the_connection_and_resends(garbage: bytes) -> None:
    async def scenario() -> None:
        broker = await FakeBroker(puback=False).start()
        got: list[Message] = []
        cl = client(broker, on_message=got.append)
        cl.start()
        await cl.wait_connected(5)
        pending = cl.publish("t", b"keep me")
        await broker.until(lambda: len(broker.of(c.Publish)) == 1)
        broker.send(garbage + c.encode_publish(b"after", b"never delivered", 0))
        await broker.until(lambda: len(broker.of(c.Connect)) == 2)  # dropped and reconnected
        await broker.until(lambda: len(broker.of(c.Publish)) == 2)
        again = broker.of(c.Publish)[1]
        assert isinstance(again, c.Publish) and again.dup and again.payload == b"keep me"
        broker.send(c.encode_puback(again.packet_id))
        await pending
        assert got == []  # nothing after the malformed packet was acted on
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_oversized_incoming_packet_drops_the_connection() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        got: list[Message] = []
        cl = client(broker, on_message=got.append, max_incoming_packet_size=64)
        cl.start()
        await cl.wait_connected(5)
        broker.send(c.encode_publish(b"t", b"x" * 100, 0))
        await broker.until(lambda: len(broker.of(c.Connect)) == 2)
        assert got == []
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_a_broker_that_stops_answering_pings_is_dropped() -> None:
    async def scenario() -> None:
        broker = await FakeBroker(pingresp=False).start()
        cl = client(broker, keepalive=1)
        lost: list[BaseException | None] = []
        cl.on_disconnect = lost.append
        cl.start()
        await cl.wait_connected(5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await broker.until(lambda: len(broker.of(c.Connect)) == 2, timeout=5)
        assert lost and loop.time() - started < 2.5  # a ping at 0.5 s, unanswered at 1 s
        assert len(broker.of(c.Pingreq)) >= 1
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_pings_keep_coming_while_idle() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        cl = client(broker, keepalive=1)
        await cl.connect()
        await broker.until(lambda: len(broker.of(c.Pingreq)) >= 3, timeout=5)
        assert cl.stats.pongs >= 2 and cl.stats.connections == 1
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_without_resend_qos1_while_disconnected_fails_at_once() -> None:
    async def scenario() -> None:
        cl = Client("127.0.0.1", 1, client_id="t", resend_on_reconnect=False)
        with pytest.raises(NotConnected):
            await cl.publish("t", b"x")
        with pytest.raises(NotConnected):
            await cl.publish("t", b"x", qos=0)

    run(scenario())


def test_a_callback_error_does_not_break_the_connection() -> None:
    async def scenario() -> None:
        broker = await FakeBroker().start()
        seen: list[Message] = []

        def boom(message: Message) -> None:
            seen.append(message)
            raise RuntimeError("application bug")

        cl = client(broker, on_message=boom)
        await cl.connect()
        broker.send(c.encode_publish(b"a", b"1", 0) + c.encode_publish(b"a", b"2", 0))
        await cl.subscribe([("x", 1)])
        assert cl.connected and [m.payload for m in seen] == [b"1", b"2"]
        await cl.stop()
        await broker.stop()

    run(scenario())


def test_publish_then_calls_back_at_the_puback_and_later_with_an_error() -> None:
    async def scenario() -> None:
        broker = await FakeBroker(puback=False).start()
        cl = client(broker, resend_on_reconnect=False, max_packet_size=100)
        await cl.connect()
        outcomes: list[tuple[str, object]] = []
        for name in ("a", "b"):
            cl.publish_then("t", name.encode(), 1, False, lambda e, name=name: outcomes.append((name, e)))
        await broker.until(lambda: len(broker.of(c.Publish)) == 2)
        pids = [p.packet_id for p in broker.of(c.Publish) if isinstance(p, c.Publish)]
        broker.send(c.encode_puback(pids[1]))
        while not outcomes:
            await asyncio.sleep(0.001)
        assert outcomes == [("b", None)]  # in any order, the right one
        cl.publish_then("t", b"x" * 95, 1, False, lambda e: outcomes.append(("big", e)))
        assert len(outcomes) == 1  # an error is never reported inside publish_then
        await asyncio.sleep(0)
        assert isinstance(outcomes[1][1], PacketTooLarge)
        cl.publish_then("t", b"boom", 1, False, lambda e: 1 / 0)  # a failing callback breaks nothing
        await broker.until(lambda: len(broker.of(c.Publish)) == 3)
        pid = [p.packet_id for p in broker.of(c.Publish) if isinstance(p, c.Publish)][2]
        broker.send(c.encode_puback(pid) + c.encode_puback(pids[0]))
        while len(outcomes) < 3:
            await asyncio.sleep(0.001)
        assert outcomes[2] == ("a", None) and cl.connected
        await cl.stop()
        await broker.stop()

    run(scenario())
