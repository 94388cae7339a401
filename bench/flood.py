"""One user floods, another chats: does the other still get through, and how fast?

Starts Mosquitto and the bridge (SQLite, default rate limit 50/s, burst 200),
then measures bob's send-message -> answer latency at a steady 20 msg/s,
first alone, then while mallory (another process) publishes send-message
as fast as paho lets it. Prints p50/p99/max for both phases and what
happened to mallory's commands.

    python bench/flood.py [--seconds 10] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import percentile, start_bridge, start_mosquitto


def client(user: str, port: int, on_message: object = None) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{user}")
    if on_message is not None:
        c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(f"chat/v1/users/{user}/inbox", qos=1)
    subscribed.wait(10)
    return c


def flood(port: int, seconds: float, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    answers = {"ok": 0, "limited": 0}

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        event = orjson.loads(msg.payload)
        if event.get("request_id"):
            answers["limited" if event["type"] == "error" else "ok"] += 1

    c = client("mallory", port, on_message)
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        c.publish(
            "chat/v1/users/mallory/commands/send-message",
            orjson.dumps({"conversation_id": "global", "body": "spam", "request_id": f"s{sent}"}),
            qos=1,
        )
        sent += 1
        if sent % 200 == 0:
            time.sleep(0)  # let paho's thread breathe
    time.sleep(2)
    c.disconnect()
    c.loop_stop()
    result.put({"sent": sent, **answers})


def measure(port: int, cid: str, seconds: float, rate: float) -> list[float]:
    pending: dict[str, float] = {}
    latencies: list[float] = []
    done = threading.Event()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        event = orjson.loads(msg.payload)
        started = pending.pop(event.get("request_id") or "", None)
        if started is not None:
            latencies.append((time.perf_counter() - started) * 1000)
            if not pending and sent_all.is_set():
                done.set()

    sent_all = threading.Event()
    bob = client("bob", port, on_message)
    interval, next_at = 1 / rate, time.perf_counter()
    for i in range(int(seconds * rate)):
        next_at += interval
        time.sleep(max(0, next_at - time.perf_counter()))
        rid = f"b{i}"
        pending[rid] = time.perf_counter()
        bob.publish(
            "chat/v1/users/bob/commands/send-message",
            orjson.dumps({"conversation_id": cid, "body": f"hello {i}", "request_id": rid}),
            qos=1,
        )
    sent_all.set()
    done.wait(30)
    bob.disconnect()
    bob.loop_stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=20, help="bob's messages per second")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chat-flood-"))
    broker, port = start_mosquitto(workdir)
    bridge = start_bridge(port, f"sqlite:///{workdir}/flood.sqlite3")
    try:
        answers: dict[str, dict[str, object]] = {}
        setup = client("bob", port, lambda _c, _u, m: answers.setdefault("x", orjson.loads(m.payload)))
        setup.publish("chat/v1/users/alice/commands/connect", b'{"session_id":"a"}', qos=1)
        setup.publish("chat/v1/users/mallory/commands/connect", b'{"session_id":"m"}', qos=1)
        setup.publish(
            "chat/v1/users/bob/commands/create-conversation",
            b'{"kind":"direct","participants":["alice"],"request_id":"x"}',
            qos=1,
        )
        while "x" not in answers:
            time.sleep(0.01)
        cid = answers["x"]["data"]["conversation"]["conversation_id"]  # type: ignore[index]
        setup.disconnect()
        setup.loop_stop()

        quiet = measure(port, cid, args.seconds, args.rate)
        queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
        flooder = multiprocessing.Process(target=flood, args=(port, args.seconds + 1, queue))
        flooder.start()
        time.sleep(0.5)
        loud = measure(port, cid, args.seconds, args.rate)
        flooder.join(60)
        flooded = queue.get(timeout=30)
    finally:
        bridge.terminate()
        bridge.wait(30)
        broker.terminate()
    rows = {"alone": quiet, "during flood": loud}
    print(f"bob: {args.rate:g} msg/s for {args.seconds:g} s, send-message -> answer (ms)")
    print(f"{'phase':14} {'answered':>9} {'p50':>7} {'p99':>7} {'max':>7}")
    for name, lat in rows.items():
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        print(f"{name:14} {len(lat):9d} {p50:7.2f} {p99:7.2f} {max(lat):7.2f}")
    print(
        f"mallory: {flooded['sent']} publish calls (most never left paho's own queue); reached the bridge: "
        f"{flooded['ok'] + flooded['limited']}, applied {flooded['ok']}, rate-limited {flooded['limited']} "
        f"({flooded['sent'] / (args.seconds + 1):.0f}/s offered)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bob": {
                        k: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99), "max": max(v)}
                        for k, v in rows.items()
                    },
                    "mallory": flooded,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
