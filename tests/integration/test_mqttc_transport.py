"""The transport adapter on the bridge's own MQTT client, against real brokers, with a listener
that records what the pipeline would be told."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from mqtt_brokers import broker
from tcpproxy import Proxy

from bridge.config import BrokerAddress
from bridge.mqtt_client import Client, Message
from bridge.mqttc_transport import MqttcTransport
from bridge.transport import Command, Disconnected, Event, EventRefused


class Recorder:
    def __init__(self) -> None:
        self.connects = 0
        self.errors: list[str] = []
        self.commands: list[Command] = []
        self.changed = asyncio.Event()

    def connected(self) -> None:
        self.connects += 1
        self.changed.set()

    def disconnected(self, error: str) -> None:
        self.errors.append(error)
        self.changed.set()

    def received(self, commands: Sequence[Command]) -> None:
        self.commands.extend(commands)
        self.changed.set()

    async def until(self, check: object, timeout: float = 10) -> None:
        async def wait() -> None:
            while not check():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@pytest.fixture(params=["mosquitto", "amqtt", "nats"])
def port(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    with broker(request.param, tmp_path) as p:
        yield p


def test_commands_in_events_out_farewell(port: int, request: pytest.FixtureRequest) -> None:
    # amqtt 0.12.1 delivers at the subscription's QoS, whatever the publish's
    typing_qos = 1 if request.node.callspec.params["port"] == "amqtt" else 0

    async def scenario() -> None:
        seen: list[bytes] = []
        qos_of: dict[bytes, int] = {}

        def watch(m: Message) -> None:
            seen.append(m.payload)
            qos_of[m.payload] = m.qos
            watcher.ack(m)

        watcher = Client("127.0.0.1", port, client_id="watcher", on_message=watch)
        await watcher.connect()
        await watcher.subscribe([("out/#", 1)])
        rec = Recorder()
        will = Event("out/status", b"offline", retain=False)
        transport = MqttcTransport(BrokerAddress("127.0.0.1", port), "cmd/+", client_id="bridge-t", will=will)
        transport.start(rec)
        await rec.until(lambda: rec.connects == 1)
        sender = Client("127.0.0.1", port, client_id="sender")
        await sender.connect()
        await asyncio.gather(*(sender.publish(f"cmd/{i}", b"%d" % i) for i in range(50)))
        await rec.until(lambda: len(rec.commands) == 50)
        assert [c.payload for c in rec.commands] == [b"%d" % i for i in range(50)]
        assert [c.topic for c in rec.commands[:2]] == ["cmd/0", "cmd/1"]
        for c in rec.commands:
            c.ack()
        await asyncio.gather(*(transport.publish(Event("out/e", b"e%d" % i)) for i in range(10)))
        typing = transport.publish(Event("out/t", b"typing", qos=0))
        assert typing.done()  # QoS 0: done once handed to the socket
        await transport.close(Event("out/status", b"bye"))
        await sender.stop()
        while b"bye" not in seen:
            await asyncio.sleep(0.01)
        assert seen == [b"e%d" % i for i in range(10)] + [b"typing", b"bye"]  # a DISCONNECT: no will
        assert qos_of[b"typing"] == typing_qos and qos_of[b"e0"] == 1
        await watcher.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_lost_connection_fails_publishes_as_disconnected_and_reconnects(tmp_path: Path) -> None:
    with broker("mosquitto", tmp_path) as port:
        proxy = Proxy("127.0.0.1", port)

        async def scenario() -> None:
            rec = Recorder()
            transport = MqttcTransport(
                BrokerAddress("127.0.0.1", proxy.port), "cmd/+", client_id="bridge-t", backoff=(0.05, 0.2)
            )
            transport.start(rec)
            await rec.until(lambda: rec.connects == 1)
            await asyncio.to_thread(proxy.cut)
            await rec.until(lambda: rec.errors)
            with pytest.raises(Disconnected):
                await transport.publish(Event("out/e", b"x"))
            proxy.restore()
            await rec.until(lambda: rec.connects == 2)
            await transport.publish(Event("out/e", b"after"))
            assert "lost mqtt://127.0.0.1" in rec.errors[0]
            await transport.close()

        try:
            asyncio.run(asyncio.wait_for(scenario(), 30))
        finally:
            proxy.close()


def test_an_event_over_the_packet_limit_is_refused_at_once(tmp_path: Path) -> None:
    with broker("mosquitto", tmp_path) as port:

        async def scenario() -> None:
            rec = Recorder()
            transport = MqttcTransport(
                BrokerAddress("127.0.0.1", port), "cmd/+", client_id="bridge-t", max_packet_size=131_072
            )
            transport.start(rec)
            await rec.until(lambda: rec.connects == 1)
            with pytest.raises(EventRefused):
                await transport.publish(Event("out/e", b"x" * 200_000))
            with pytest.raises(EventRefused):
                await transport.publish(Event("out/+", b"x"))
            await transport.publish(Event("out/e", b"fine"))
            assert transport.client.stats.connections == 1
            await transport.close()

        asyncio.run(asyncio.wait_for(scenario(), 30))


def test_an_unreachable_broker_is_reported(tmp_path: Path) -> None:
    from conftest import free_port

    async def scenario() -> None:
        rec = Recorder()
        transport = MqttcTransport(BrokerAddress("127.0.0.1", free_port()), "cmd/+", backoff=(0.05, 0.1))
        transport.start(rec)
        await rec.until(lambda: rec.errors)
        assert rec.errors[0].startswith("cannot connect to mqtt://127.0.0.1:")
        assert "refused" in rec.errors[0].lower()
        await transport.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_unacknowledged_commands_come_again_after_a_restart(tmp_path: Path) -> None:
    with broker("mosquitto", tmp_path) as port:

        async def scenario() -> None:
            rec = Recorder()
            address = BrokerAddress("127.0.0.1", port)
            transport = MqttcTransport(address, "cmd/+", client_id="bridge-t")
            transport.start(rec)
            await rec.until(lambda: rec.connects == 1)
            sender = Client("127.0.0.1", port, client_id="sender")
            await sender.connect()
            await asyncio.gather(*(sender.publish("cmd/a", b"%d" % i) for i in range(3)))
            await rec.until(lambda: len(rec.commands) == 3)
            rec.commands[0].ack()  # committed; 2 and 3 are not
            await transport.close()
            again = Recorder()
            second = MqttcTransport(address, "cmd/+", client_id="bridge-t")
            second.start(again)
            await again.until(lambda: len(again.commands) == 2)
            assert [c.payload for c in again.commands] == [b"1", b"2"]
            for c in again.commands:
                c.ack()
            await second.close()
            await sender.stop()

        asyncio.run(asyncio.wait_for(scenario(), 30))
