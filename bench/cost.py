"""Cost, not count: can one user (or forty) within every command limit slow a bystander down?

Bob sends send-message into a direct conversation at a steady rate and times each answer while one
of these loads runs (each within the bridge's command limit of 50/s and the brokers' flood guards):

- `group100`: mallory sends 50 msg/s into a group of 100 (nobody has to consent to being in it);
- `global1000`: mallory sends 50 msg/s into `global`, with 1,000 known users who are not online;
- `presence`: mallory connects and disconnects 25 times a second while 1,000 users are online;
- `sybil40`: 40 accounts each send 40 msg/s, each into its own group of 100.

Each load runs with the cost budget at its defaults (`on`: --cost-limit 500, --cost-burst 500,
--cost-total 4000) and without it (`off`: --cost-limit 0), against Mosquitto (dev.conf) and SQLite;
`none` is bob alone. Users, sessions and groups are written into the database before the bridge
starts (--session-grace is long, so the seeded sessions stay online).

    python bench/cost.py [--seconds 5] [--rate 10] [--scenarios group100,...] [--modes on,off]

Prints bob's answered/sent and send -> answer p50/p99/max (ms), the bridge's CPU, and the load's
stored messages. Target (with the budget on): bob's p50 under 20 ms and p99 under 100 ms in every
scenario, every one of his commands answered.
"""

from __future__ import annotations

import argparse
import multiprocessing
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
from harness import client, percentile, proc_stats, start_bridge, start_mosquitto

from bridge.model import ChatSession, Conversation, User, direct_key
from bridge.sql import SqlUnitOfWork, init_db, make_engine

COMMAND = "chat/v1/users/{}/commands/{}"
SCENARIOS = ("none", "group100", "global1000", "presence", "sybil40")
DIRECT = "d-bob-alice"


def seed(db: Path, scenario: str) -> None:
    """Users, sessions and conversations, straight into the database."""
    engine = make_engine(f"sqlite:///{db}")
    init_db(engine, 0)
    with SqlUnitOfWork(engine).transaction() as store:
        for u in ("alice", "bob", "mallory"):
            store.save_user(User(u, None, 0))
        store.add_conversation(
            Conversation(DIRECT, "direct", None, None, None, None, 1),
            ["bob", "alice"],
            direct_key("bob", "alice"),
        )
        crowd = [f"u{i:04d}" for i in range(1000 if scenario in ("global1000", "presence") else 99)]
        for u in crowd:
            store.save_user(User(u, f"User {u}", 0))
            if scenario == "presence":
                store.save_session(ChatSession(u, "s", "seed", 0))
        if scenario == "group100":
            store.add_conversation(
                Conversation("g-mallory", "group", "g", "mallory", None, None, 2), ["mallory", *crowd[:99]]
            )
        if scenario == "sybil40":
            for i in range(40):
                store.save_user(User(f"s{i:02d}", None, 0))
                store.add_conversation(
                    Conversation(f"g-s{i:02d}", "group", "g", f"s{i:02d}", None, None, 3 + i),
                    [f"s{i:02d}", *crowd[:99]],
                )
    engine.dispose()


def load(port: int, scenario: str, seconds: float) -> None:
    """Publishes the scenario's commands at their paced rates (a separate process)."""
    c = client(f"load-{scenario}", port)
    sends: list[tuple[str, str, bytes]] = []  # (user, command, payload) per tick
    if scenario in ("group100", "global1000"):
        cid = "g-mallory" if scenario == "group100" else "global"
        rate = 50.0
        sends = [("mallory", "send-message", orjson.dumps({"conversation_id": cid, "body": "load"}))]
    elif scenario == "presence":
        rate = 25.0
    elif scenario == "sybil40":
        rate = 40.0
        sends = [
            (f"s{i:02d}", "send-message", orjson.dumps({"conversation_id": f"g-s{i:02d}", "body": "load"}))
            for i in range(40)
        ]
    else:
        return
    interval, next_at, tick = 1 / rate, time.perf_counter(), 0
    end = next_at + seconds
    while next_at < end:
        next_at += interval
        time.sleep(max(0, next_at - time.perf_counter()))
        if scenario == "presence":
            session = orjson.dumps({"session_id": f"f{tick}"})
            c.publish(COMMAND.format("mallory", "connect"), session, qos=1)
            c.publish(
                COMMAND.format("mallory", "disconnect"),
                orjson.dumps({"session_id": f"f{tick}", "reason": "lost"}),
                qos=1,
            )
        for user, command, payload in sends:
            c.publish(COMMAND.format(user, command), payload, qos=1)
        tick += 1
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def measure(port: int, seconds: float, rate: float) -> tuple[list[float], int]:
    """Bob's send -> answer latencies (ms), and how many he sent."""
    pending: dict[str, float] = {}
    latencies: list[float] = []
    done, sent_all = threading.Event(), threading.Event()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        started = pending.pop(orjson.loads(msg.payload).get("request_id") or "", None)
        if started is not None:
            latencies.append((time.perf_counter() - started) * 1000)
            if not pending and sent_all.is_set():
                done.set()

    bob = client(f"bob:{time.monotonic_ns()}", port, ["chat/v1/users/bob/inbox"], on_message)
    count = int(seconds * rate)
    interval, next_at = 1 / rate, time.perf_counter()
    for i in range(count):
        next_at += interval
        time.sleep(max(0, next_at - time.perf_counter()))
        rid = f"b{i}"
        pending[rid] = time.perf_counter()
        bob.publish(
            COMMAND.format("bob", "send-message"),
            orjson.dumps({"conversation_id": DIRECT, "body": f"hello {i}", "request_id": rid}),
            qos=1,
        )
    sent_all.set()
    if pending:
        done.wait(60)
    bob.disconnect()
    bob.loop_stop()
    return latencies, count


def stored_load(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from messages where body = 'load'").fetchone()[0])


def run(scenario: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="chat-cost-"))
    db = work / "bench.sqlite3"
    seed(db, scenario)
    broker, port = start_mosquitto(work)
    extra = ["--session-grace", "3600", *args.bridge_args.split()]
    extra += ["--cost-limit", "0"] if mode == "off" else []
    bridge = start_bridge(port, f"sqlite:///{db}", *extra)
    try:
        time.sleep(1)
        cpu0, t0 = proc_stats(bridge.pid)[0], time.monotonic()
        loader = multiprocessing.Process(target=load, args=(port, scenario, args.seconds))
        loader.start()
        latencies, sent = measure(port, args.seconds, args.rate)
        loader.join(60)
        cpu = (proc_stats(bridge.pid)[0] - cpu0) / (time.monotonic() - t0) * 100
        return {
            "scenario": scenario,
            "cost budget": mode,
            "answered": len(latencies),
            "sent": sent,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies, default=float("nan")),
            "bridge_cpu": cpu,
            "load_stored": stored_load(db),
        }
    finally:
        for proc in (bridge, broker):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:  # a bridge deep in a backlog stops late: do not wait
                proc.kill()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5, help="length of each load")
    parser.add_argument(
        "--rate",
        type=float,
        default=10,
        help="bob's messages per second (at most 16: more is not light, see docs)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--modes", default="on,off", help="comma-separated: on, off")
    parser.add_argument("--bridge-args", default="", help="more options for chat-bridge serve")
    args = parser.parse_args()
    print(f"# bob sends {args.rate:g} msg/s for {args.seconds:g} s per load; send -> answer ms")
    head = ("scenario", "budget", "answered", "p50", "p99", "max", "bridge", "stored")
    print("{:<11} {:<6} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}".format(*head))
    for scenario in args.scenarios.split(","):
        for mode in ["on"] if scenario == "none" else args.modes.split(","):
            r = run(scenario, mode, args)
            print(
                f"{r['scenario']:<11} {r['cost budget']:<6} {r['answered']:>4}/{r['sent']:<4} "
                f"{r['p50']:>9.2f} {r['p99']:>9.2f} {r['max']:>9.2f} {r['bridge_cpu']:>6.0f}% "
                f"{r['load_stored']:>7}",
                flush=True,
            )


if __name__ == "__main__":
    main()
