"""A worker's MQTT connection for retained topics (presence, the bridge status) moves to the next
MQTT listener of the cluster when its node dies: it stayed on the dead one (paho refuses a new host
while the old connection is being torn down), so a new housekeeping leader could not say `online`."""

from __future__ import annotations

import asyncio

from test_ordered_paho import WAIT, ScriptedBroker

from bridge.config import BrokerAddress
from bridge.worker import RetainedPublisher


def test_it_moves_to_the_next_listener_when_its_node_dies() -> None:
    first, second = ScriptedBroker(), ScriptedBroker()
    second.acknowledge.set()
    states: list[tuple[bool, str | None]] = []
    publisher = RetainedPublisher(
        [BrokerAddress("127.0.0.1", first.port), BrokerAddress("127.0.0.1", second.port)],
        "chat-bridge:w-test",
        on_state=lambda up, error: states.append((up, error)),
    )

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        publisher.start(loop)
        ScriptedBroker.answer(await loop.run_in_executor(None, first.next_connect), False)
        first.listener.close()  # the node is gone: its port refuses
        first.drop()
        ScriptedBroker.answer(await loop.run_in_executor(None, second.next_connect), False)
        await asyncio.wait_for(publisher.publish("chat/v1/bridge/status", b'{"status":"online"}'), WAIT)

    try:
        asyncio.run(scenario())
    finally:
        publisher.stop()
    assert [p.topic for p in second.publishes] == ["chat/v1/bridge/status"]
    assert second.publishes[0].retain
    assert states[-1] == (True, None)
