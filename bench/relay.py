"""The same-shape relay: what the bridge's MQTT traffic costs without the bridge's work.

It subscribes to `bench/relay/users/+/commands/send-message` at QoS 1 and, for
each command, publishes three QoS 1 events as the bridge would (the sender's
answer, the partner's message-added and the conversation topic's), then
acknowledges the command. No validation, no storage. bench/throughput.py runs it
on the same MQTT library as the bridge and prints the bridge's ratio to it: the
bridge's own efficiency, with the broker's share of the CPU taken out.

    python bench/relay.py --library mqttc|paho --port PORT --pairs pairs.json

`pairs.json` lists [sender, receiver, conversation] triples. Prints "relay online"
on stderr once subscribed; runs until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMMANDS = "bench/relay/users/+/commands/send-message"
PREFIX = "chat/v1"


def events(topic: str, payload: bytes, partner: dict[str, tuple[str, str]]) -> list[tuple[str, bytes]]:
    """The three events of a send-message, shaped like the bridge's (sizes within a few bytes)."""
    sender = topic.split("/")[3]
    command = orjson.loads(payload)
    conv = command["conversation_id"]
    receiver, _ = partner[sender]
    now = time.time()
    message = {
        "message_id": uuid.uuid4().hex,
        "conversation_id": conv,
        "sender_id": sender,
        "body": command["body"],
        "seq": 1,
        "created_at": now,
        "edited_at": None,
        "deleted": False,
    }

    def event(request_id: str | None) -> bytes:
        return orjson.dumps(
            {
                "type": "message-added",
                "event_id": uuid.uuid4().hex,
                "request_id": request_id,
                "data": {"message": message},
            }
        )

    return [
        (f"{PREFIX}/users/{sender}/inbox", event(command.get("request_id") or "r")),
        (f"{PREFIX}/users/{receiver}/inbox", event(None)),
        (f"{PREFIX}/conversations/{conv}/events", event(None)),
    ]


def run_paho(port: int, partner: dict[str, tuple[str, str]]) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-relay", clean_session=False, manual_ack=True
    )

    def no_delay(_c: object, _u: object, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_message(_c: object, _u: object, msg: Any) -> None:
        for topic, payload in events(msg.topic, msg.payload, partner):
            c.publish(topic, payload, qos=1)
        c.ack(msg.mid, msg.qos)

    subscribed = threading.Event()
    c.on_socket_open = no_delay
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.max_queued_messages_set(60_000)
    c.connect("127.0.0.1", port)
    c.subscribe(COMMANDS, qos=1)
    c.loop_start()
    subscribed.wait(10)
    print("relay online", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    c.disconnect()
    c.loop_stop()


async def run_mqttc(port: int, partner: dict[str, tuple[str, str]]) -> None:
    from bridge.mqtt_client import Client, Message

    def on_messages(messages: list[Message]) -> None:
        for m in messages:
            for topic, payload in events(m.topic, m.payload, partner):
                c.publish(topic, payload, 1)
            c.ack(m)

    c = Client("127.0.0.1", port, client_id="bench-relay", window=10_000, on_messages=on_messages)
    c.start()
    await c.wait_connected(10)
    await c.subscribe([(COMMANDS, 1)])
    print("relay online", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await c.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--library", choices=["mqttc", "paho"], default="mqttc")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    args = parser.parse_args()
    partner: dict[str, tuple[str, str]] = {}
    for sender, receiver, conv in json.loads(args.pairs.read_text()):
        partner[sender] = (receiver, conv)
        partner[receiver] = (sender, conv)
    if args.library == "paho":
        run_paho(args.port, partner)
    else:
        asyncio.run(run_mqttc(args.port, partner))


if __name__ == "__main__":
    main()
