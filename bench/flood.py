"""One user floods, another chats: does the other still get through, and how fast?

Bob sends send-message at a steady 20 msg/s and times each answer, first alone,
then while mallory floods. Two flooders: `paho` (a Python client publishing
send-message as fast as paho lets it) and `c` (`mosquitto_pub -l`, QoS 1,
what a native client manages: tens of thousands per second). Each runs against
Mosquitto without and with the flood guard (`mosquitto/plugins/flood_guard.c`,
rate 100/s, burst 300, as in the shipped mosquitto.conf). The bridge uses
SQLite and its default rate limit (50/s, burst 200). `--embedded` runs the same
against `chat-bridge serve`'s embedded amqtt broker, whose guard is always on.

The flooder runs at idle CPU priority by default (`--flooder-priority`): on a
2-core machine its own CPU (a whole core) would otherwise be taken from the
broker and the bridge, which a remote attacker's is not. `normal` measures that
too. Every client sets TCP_NODELAY: paho leaves Nagle's algorithm on, and a
client that acknowledges QoS 1 deliveries and then publishes can wait up to
40 ms on its own socket (measured here: it was most of the "slow-down" we once
blamed on the bridge).

`--connections N` floods with the paho flooder over N connections of mallory's account (client ids
`mallory:1`...), each reading her inbox, as an account at its connection cap would.

    python bench/flood.py [--seconds 10] [--rate 20] [--flooders paho,c] [--connections 1] [--json FILE]

Prints, per phase, bob's send -> answer latency (p50/p99/max ms), the publishes
per second the broker received (from $SYS), the bridge's CPU, and how many of
mallory's messages were stored.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import client, percentile, proc_stats, start_bridge, start_embedded, start_mosquitto

ROOT = Path(__file__).resolve().parent.parent

COMMAND = "chat/v1/users/{}/commands/send-message"
SPAM = b'{"conversation_id":"global","body":"spam"}'
GUARD = ROOT / "mosquitto" / "plugins" / "chat_flood_guard.so"


def _idle_priority() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def paho_flood(port: int, seconds: float, idle: bool, cid: str = "mallory-paho") -> None:
    """Publishes as fast as paho lets it (mallory also reads her inbox, as a client would)."""
    if idle:
        _idle_priority()
    c = client(cid, port, ["chat/v1/users/mallory/inbox"], lambda *a: None)
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        c.publish(COMMAND.format("mallory"), SPAM, qos=1)
        sent += 1
        if sent % 200 == 0:
            time.sleep(0)  # let paho's network thread send
    c.disconnect()
    c.loop_stop()


class Flooder:
    def __init__(self, kind: str, port: int, seconds: float, idle: bool, connections: int = 1) -> None:
        self.kind = kind
        self.others: list[Any] = []
        if kind == "paho":
            self.proc: Any = multiprocessing.Process(target=paho_flood, args=(port, seconds, idle))
            self.proc.start()
            for i in range(1, connections):  # more connections of the same account
                other = multiprocessing.Process(target=paho_flood, args=(port, seconds, idle, f"mallory:{i}"))
                other.start()
                self.others.append(other)
        else:
            spam = SPAM.decode()
            cmd = (
                f"yes '{spam}' | {'chrt --idle 0 ' if idle else ''}"
                f"mosquitto_pub -l -q 1 -p {port} -i mallory-c -t {COMMAND.format('mallory')}"
            )
            self.proc = subprocess.Popen(cmd, shell=True, start_new_session=True)

    def stop(self) -> None:
        if self.kind == "paho":
            self.proc.join(60)
            for other in self.others:
                other.join(60)
        else:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(10)


class BrokerCounter:
    """Publishes the broker received, from $SYS (published every second here)."""

    def __init__(self, port: int) -> None:
        self.value = 0
        self._changed = threading.Condition()
        self.c = client("sys-watch", port, on_message=self._on_message)
        self.c.subscribe("$SYS/broker/publish/messages/received")

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._changed:
            self.value = int(msg.payload)
            self._changed.notify_all()

    def fresh(self) -> int:
        """The next value the broker publishes (so that it is at most ~1 s old)."""
        with self._changed:
            before = self.value
            self._changed.wait_for(lambda: self.value != before, timeout=3)
            return self.value


def measure(port: int, cid: str, seconds: float, rate: float) -> list[float]:
    pending: dict[str, float] = {}
    latencies: list[float] = []
    done = threading.Event()
    sent_all = threading.Event()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        started = pending.pop(orjson.loads(msg.payload).get("request_id") or "", None)
        if started is not None:
            latencies.append((time.perf_counter() - started) * 1000)
            if not pending and sent_all.is_set():
                done.set()

    bob = client(f"bob-{time.monotonic_ns()}", port, ["chat/v1/users/bob/inbox"], on_message)
    interval, next_at = 1 / rate, time.perf_counter()
    for i in range(int(seconds * rate)):
        next_at += interval
        time.sleep(max(0, next_at - time.perf_counter()))
        rid = f"b{i}"
        pending[rid] = time.perf_counter()
        bob.publish(
            COMMAND.format("bob"),
            orjson.dumps({"conversation_id": cid, "body": f"hello {i}", "request_id": rid}),
            qos=1,
        )
    sent_all.set()
    if pending:
        done.wait(60)
    bob.disconnect()
    bob.loop_stop()
    return latencies


def stored_spam(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from messages where sender_id = 'mallory'").fetchone()[0])


def run_setup(guard: bool, args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="chat-flood-"))
    db = workdir / "flood.sqlite3"
    broker: subprocess.Popen[str] | None = None
    if args.embedded:  # amqtt in the bridge's process, its flood guard on (the default rate limit)
        bridge, port = start_embedded(f"sqlite:///{db}")
    else:
        extra = ["sys_interval 1"]
        if guard:
            extra += [f"plugin {GUARD}", "plugin_opt_rate 100", "plugin_opt_burst 300"]
        broker, port = start_mosquitto(workdir, extra=tuple(extra))
        bridge = start_bridge(port, f"sqlite:///{db}")
    rows = []
    try:
        answers: dict[str, Any] = {}
        got = threading.Event()

        def on_setup(_c: object, _u: object, m: paho.MQTTMessage) -> None:
            answers.update(orjson.loads(m.payload))
            got.set()

        setup = client("setup", port, ["chat/v1/users/bob/inbox"], on_setup)
        for user in ("alice", "mallory"):
            setup.publish(
                COMMAND.format(user).replace("send-message", "connect"), b'{"session_id":"s"}', qos=1
            )
        setup.publish(
            COMMAND.format("bob").replace("send-message", "create-conversation"),
            b'{"kind":"direct","participants":["alice"],"request_id":"x"}',
            qos=1,
        )
        if not got.wait(30):
            raise RuntimeError("the bridge never answered")
        cid = answers["data"]["conversation"]["conversation_id"]
        setup.disconnect()
        setup.loop_stop()
        counter = None if args.embedded else BrokerCounter(port)
        phases: list[str | None] = [None, *args.flooders]
        for kind in phases:
            spam0 = stored_spam(db)
            received0 = counter.fresh() if counter else 0
            cpu0, t0 = proc_stats(bridge.pid)[0], time.monotonic()
            flooder = None
            if kind:
                flooder = Flooder(
                    kind, port, args.seconds + 1, args.flooder_priority == "idle", args.connections
                )
                time.sleep(0.5)  # let the flood build up before bob starts
            lat = measure(port, cid, args.seconds, args.rate)
            received1 = counter.fresh() if counter else 0
            cpu1, t1 = proc_stats(bridge.pid)[0], time.monotonic()
            if flooder:
                flooder.stop()
            rows.append(
                {
                    "guard": guard,
                    "flooder": kind or "none",
                    "answered": len(lat),
                    "sent": int(args.seconds * args.rate),
                    "p50": percentile(lat, 0.5) if lat else None,
                    "p99": percentile(lat, 0.99) if lat else None,
                    "max": max(lat) if lat else None,
                    "broker_publishes_per_s": round((received1 - received0) / (t1 - t0)) if counter else None,
                    "bridge_cpu_percent": round((cpu1 - cpu0) / (t1 - t0) * 100),
                    "mallory_stored": stored_spam(db) - spam0,
                }
            )
            print_row(rows[-1])
            if kind:  # let the broker and the bridge drain what the flood left before the next phase
                drain = measure(port, cid, 1, 5)
                if len(drain) < 5:
                    print("   (the bridge had not caught up 60 s after the flood)")
        if counter:
            counter.c.disconnect()
    finally:
        bridge.terminate()
        bridge.wait(30)
        if broker:
            broker.terminate()
    return rows


def fmt(v: float | None) -> str:
    return f"{v:8.2f}" if v is not None else "       -"


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{'on' if r['guard'] else 'off':5} {r['flooder']:7} {r['answered']:4}/{r['sent']:<4} "
        f"{fmt(r['p50'])} {fmt(r['p99'])} {fmt(r['max'])} {r['broker_publishes_per_s'] or '-':>10} "
        f"{r['bridge_cpu_percent']:6}% {r['mallory_stored']:8}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--rate", type=float, default=20, help="bob's messages per second")
    parser.add_argument("--flooders", default="paho,c", help="comma-separated: paho, c")
    parser.add_argument(
        "--connections", type=int, default=1, help="paho flooder: connections of mallory's account"
    )
    parser.add_argument("--flooder-priority", choices=["idle", "normal"], default="idle")
    parser.add_argument("--guard", choices=["both", "off", "on"], default="both")
    parser.add_argument(
        "--embedded", action="store_true", help="the embedded amqtt broker (its guard is always on)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.flooders = [f for f in args.flooders.split(",") if f]
    if "c" in args.flooders and not shutil.which("mosquitto_pub"):
        sys.exit("the c flooder needs mosquitto_pub (apt-get install mosquitto-clients)")
    guards = [True] if args.embedded else {"both": [False, True], "off": [False], "on": [True]}[args.guard]
    if True in guards and not args.embedded and not GUARD.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build-flood-guard")], check=True)
    print(
        f"bob: {args.rate:g} msg/s for {args.seconds:g} s per phase, send-message -> answer (ms); "
        f"flooder at {args.flooder_priority} CPU priority, {args.connections} connection(s); "
        f"uptime: {os.popen('uptime').read().strip()}"
    )
    print(f"{'guard':5} {'flooder':7} answered      p50      p99      max  broker/s  bridge  mallory")
    rows = [row for guard in guards for row in run_setup(guard, args)]
    if args.json:
        args.json.write_text(json.dumps({"priority": args.flooder_priority, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
