"""Throughput and latency of the bridge, side by side with the raw broker relay, in one run.

For the same traffic shape, U users in U/2 direct pairs, each sender sending N
messages to its partner at QoS 1, it measures:

  raw    paho sender -> Mosquitto -> paho receiver (no bridge)
  bridge send-message -> bridge (store, then publish) -> message-added at the partner

closed loop (senders publish as fast as paho lets them; throughput = messages
delivered / time from the first send to the last delivery) and open loop at a
fixed total rate (latency send -> delivery, from a timestamp in the body).
Load comes from separate processes. Prints messages/s, p50/p99/max latency,
the bridge's CPU and RSS, and the ratio to the raw relay.

    python bench/throughput.py [--users 20] [--messages 500] [--rate 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import percentile, start_bridge, start_mosquitto

PROCESSES = 2  # load generators; the machine has 2 cores


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def client(cid: str, port: int, topics: list[str], on_message: Any) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if topics:
        c.subscribe([(t, 1) for t in topics])
        assert subscribed.wait(10)
    sock = c.socket()
    if sock is not None:
        import socket

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def worker(
    mode: str,
    port: int,
    pairs: list[tuple[str, str, str]],
    messages: int,
    rate: float,
    start_at: float,
    out: mp.Queue,
) -> None:  # type: ignore[type-arg]
    """Runs some sender/receiver pairs; reports delivery timestamps and latencies."""
    latencies: list[float] = []
    last = [0.0]
    expected = len(pairs) * messages
    done = threading.Event()
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        if mode == "raw":
            sent = float(msg.payload.split(b"|", 1)[0])
        else:
            event = orjson.loads(msg.payload)
            if event["type"] != "message-added" or event["request_id"]:
                return
            sent = float(event["data"]["message"]["body"].split("|", 1)[0])
        with lock:
            latencies.append((now - sent) * 1000)
            last[0] = now
            if len(latencies) >= expected:
                done.set()

    receivers, senders = [], []
    for sender, receiver, conv in pairs:
        topic = f"bench/raw/{receiver}" if mode == "raw" else f"chat/v1/users/{receiver}/inbox"
        receivers.append(client(f"r-{mode}-{receiver}", port, [topic], on_message))
        senders.append((client(f"s-{mode}-{sender}", port, [], None), sender, receiver, conv))
    time.sleep(max(0.0, start_at - time.time()))
    first = time.time()
    # Open loop: messages evenly spaced (not bursts of one per sender), whatever the latency.
    interval = 1 / rate if rate else 0.0
    next_at = time.monotonic()
    for n in range(messages):
        for c, sender, receiver, conv in senders:
            stamp = f"{time.time():.6f}|{n}"
            if mode == "raw":
                c.publish(f"bench/raw/{receiver}", stamp.encode(), qos=1)
            else:
                c.publish(
                    f"chat/v1/users/{sender}/commands/send-message",
                    orjson.dumps({"conversation_id": conv, "body": stamp}),
                    qos=1,
                )
            if interval:
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
    done.wait(120)
    for c in receivers + [s[0] for s in senders]:
        c.disconnect()
        c.loop_stop()
    out.put({"first": first, "last": last[0], "latencies": latencies, "expected": expected})


def setup_conversations(port: int, users: int) -> list[tuple[str, str, str]]:
    """Direct conversations for pairs (u0,u1), (u2,u3), ...; returns (sender, receiver, conversation)."""
    answers: dict[str, dict[str, Any]] = {}
    got = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        event = orjson.loads(msg.payload)
        if event.get("request_id"):
            with got:
                answers[event["request_id"]] = event
                got.notify_all()

    names = [f"u{i}" for i in range(users)]
    c = client("bench-setup", port, [f"chat/v1/users/{n}/inbox" for n in names], on_message)
    for n in names:
        c.publish(f"chat/v1/users/{n}/commands/connect", orjson.dumps({"session_id": f"{n}-s"}), qos=1)
    pairs = []
    for i in range(0, users, 2):
        rid = f"setup-{i}"
        c.publish(
            f"chat/v1/users/{names[i]}/commands/create-conversation",
            orjson.dumps({"kind": "direct", "participants": [names[i + 1]], "request_id": rid}),
            qos=1,
        )
        with got:
            assert got.wait_for(lambda rid=rid: rid in answers, 30)
        pairs.append((names[i], names[i + 1], answers[rid]["data"]["conversation"]["conversation_id"]))
    c.disconnect()
    c.loop_stop()
    return pairs


def run(
    mode: str,
    port: int,
    pairs: list[tuple[str, str, str]],
    messages: int,
    rate: float,
    bridge_pid: int | None,
) -> dict[str, Any]:
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 2.0
    chunks = [pairs[i::PROCESSES] for i in range(PROCESSES)]
    procs = [
        mp.Process(
            target=worker,
            args=(mode, port, chunk, messages, rate / PROCESSES if rate else 0.0, start_at, out),
        )
        for chunk in chunks
        if chunk
    ]
    cpu0 = proc_stats(bridge_pid)[0] if bridge_pid else 0.0
    for p in procs:
        p.start()
    results = [out.get(timeout=200) for _ in procs]
    for p in procs:
        p.join(30)
    cpu1, rss = proc_stats(bridge_pid) if bridge_pid else (0.0, 0)
    lat = [x for r in results for x in r["latencies"]]
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    delivered = len(lat)
    seconds = max(last - first, 1e-9)
    return {
        "mode": mode,
        "offered_rate": rate or "max",
        "delivered": delivered,
        "expected": sum(r["expected"] for r in results),
        "seconds": round(seconds, 3),
        "msgs_per_s": round(delivered / seconds, 1),
        "p50_ms": round(percentile(lat, 0.5), 2),
        "p99_ms": round(percentile(lat, 0.99), 2),
        "max_ms": round(max(lat), 2) if lat else None,
        "bridge_cpu_percent": round((cpu1 - cpu0) / (time.time() - start_at) * 100, 1)
        if bridge_pid
        else None,
        "bridge_rss_mb": round(rss / 2**20, 1) if bridge_pid else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--messages", type=int, default=500, help="per sender")
    parser.add_argument("--rate", type=float, default=500, help="total msg/s for the open-loop run")
    parser.add_argument("--database-url")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chat-throughput-"))
    broker, port = start_mosquitto(workdir)
    bridge = start_bridge(
        port, args.database_url or f"sqlite:///{workdir}/bench.sqlite3", "--rate-limit", "0"
    )
    try:
        pairs = setup_conversations(port, args.users)
        rows = [
            run("raw", port, pairs, args.messages, 0, None),
            run("bridge", port, pairs, args.messages, 0, bridge.pid),
            run("raw", port, pairs, max(1, args.messages // 2), args.rate, None),
            run("bridge", port, pairs, max(1, args.messages // 2), args.rate, bridge.pid),
        ]
    finally:
        bridge.terminate()
        bridge.wait(30)
        broker.terminate()
    print(f"{args.users} users in {args.users // 2} direct pairs, QoS 1, SQLite, Mosquitto (tcp_nodelay)")
    print(
        f"{'run':8} {'offered':>8} {'delivered':>9} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'CPU %':>6} {'RSS MB':>7}"
    )
    for r in rows:
        cells = (
            r["mode"],
            r["offered_rate"],
            r["delivered"],
            r["msgs_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["max_ms"],
            r["bridge_cpu_percent"],
            r["bridge_rss_mb"],
        )
        print("{!s:8} {!s:>8} {!s:>9} {!s:>9} {!s:>8} {!s:>8} {!s:>8} {!s:>6} {!s:>7}".format(*cells))
    ratio = rows[1]["msgs_per_s"] / rows[0]["msgs_per_s"]
    print(f"closed loop: bridge / raw relay = {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
