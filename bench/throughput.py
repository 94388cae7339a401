"""Throughput and latency of the bridge, side by side with the raw broker relay, in one run.

For the same traffic shape, U users in U/2 direct pairs, each sender sending N
messages to its partner at QoS 1, it measures:

  raw    paho sender -> Mosquitto -> paho receiver (no bridge)
  relay  send-message -> the same-shape relay (bench/relay.py: three QoS 1 events per
         command, acknowledged after, no storage; on the bridge's MQTT library)
         -> message-added at the partner
  bridge send-message -> bridge (store, then publish) -> message-added at the partner

closed loop (senders publish as fast as paho lets them; throughput = messages
delivered / time from the first send to the last delivery), then open loop at
500 msg/s and at 25/50/75 % of the bridge's closed-loop maximum, messages
evenly spaced (latency send -> delivery, from a timestamp in the body). Load
comes from two separate processes. Then, in the same run, the closed loop
again (at most 500 messages per sender, 150 with --quick) with the bridge's embedded amqtt broker
(`chat-bridge serve --listen`) beside the raw relay through amqtt alone.

Prints messages/s, events/s, p50/p99/max latency, the CPU and RSS of the bridge
(and of the relay), the CPU time per delivered chat message (process CPU seconds
/ messages delivered, and the same per thread of the bridge), the bridge's ratios
to the raw and to the same-shape relay, the load average, and a table of the
targets, met or not; writes bench/results/throughput.json and throughput.png.

    python bench/throughput.py [--quick] [--embedded | --no-embedded] [--client mqttc|paho]
                               [--database-url URL]

--embedded runs every phase on the embedded broker instead of Mosquitto (the raw
relay then goes through that same amqtt); --no-embedded skips the embedded phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    client,
    percentile,
    proc_stats,
    start_amqtt,
    start_bridge,
    start_embedded,
    start_mosquitto,
    wait_for_line,
)

PROCESSES = 2  # load generators; the machine has 2 cores


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
                prefix = "bench/relay" if mode == "relay" else "chat/v1"
                c.publish(
                    f"{prefix}/users/{sender}/commands/send-message",
                    orjson.dumps({"conversation_id": conv, "body": stamp}),
                    qos=1,
                )
            if interval:
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
    # after the last send: until everything arrived, or nothing more did for 30 s
    seen, quiet_since = -1, time.monotonic()
    while not done.wait(1) and time.monotonic() - quiet_since < 30:
        if len(latencies) != seen:
            seen, quiet_since = len(latencies), time.monotonic()
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


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by the process's main thread (the bridge's event loop) and by its other
    threads together (the database thread above all; Python does not name threads for /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage = {"loop": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        usage["loop" if task.name == str(pid) else "other threads"] += (
            int(fields[11]) + int(fields[12])
        ) / ticks
    return usage


def run(
    mode: str,
    port: int,
    pairs: list[tuple[str, str, str]],
    messages: int,
    rate: float,
    bridge_pid: int | None,
) -> dict[str, Any]:
    """One run; `bridge_pid` is the process whose CPU and RSS are measured (the bridge or the relay)."""
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
    threads0 = thread_cpu(bridge_pid) if bridge_pid else {}
    for p in procs:
        p.start()
    budget = 600 + (messages * len(pairs) / rate if rate else 0)
    results = [out.get(timeout=budget) for _ in procs]
    for p in procs:
        p.join(30)
    cpu1, rss = proc_stats(bridge_pid) if bridge_pid else (0.0, 0)
    threads1 = thread_cpu(bridge_pid) if bridge_pid else {}
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
        # the bridge publishes three events per message: the sender's answer, the partner's copy and
        # the conversation topic's; the raw relay one
        "events_per_s": round(delivered * (1 if mode == "raw" else 3) / seconds),
        "p50_ms": round(percentile(lat, 0.5), 2),
        "p99_ms": round(percentile(lat, 0.99), 2),
        "max_ms": round(max(lat), 2) if lat else None,
        "bridge_cpu_percent": round((cpu1 - cpu0) / (time.time() - start_at) * 100, 1)
        if bridge_pid
        else None,
        "bridge_rss_mb": round(rss / 2**20, 1) if bridge_pid else None,
        # process CPU time / chat messages delivered, the whole run (set-up of the senders excluded)
        "cpu_us_per_msg": round((cpu1 - cpu0) / delivered * 1e6, 1) if bridge_pid and delivered else None,
        # the same, for the event loop's thread and for the others (a thread that ended is not counted)
        "thread_us_per_msg": {
            name: round((used - threads0.get(name, 0.0)) / delivered * 1e6, 1)
            for name, used in threads1.items()
        }
        if bridge_pid and delivered
        else {},
    }


def start_relay(
    workdir: Path, port: int, pairs: list[tuple[str, str, str]], library: str
) -> subprocess.Popen[str]:
    """bench/relay.py on `library`, once it is subscribed."""
    path = workdir / "pairs.json"
    path.write_text(json.dumps(pairs))
    relay = Path(__file__).resolve().parent / "relay.py"
    args = ["--library", library, "--port", str(port), "--pairs", str(path)]
    proc = subprocess.Popen([sys.executable, str(relay), *args], stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "relay online")
    return proc


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':7} {'offered':>8} {'delivered':>9} {'msg/s':>8} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    )
    head += f" {'max ms':>8} {'CPU %':>6} {'RSS MB':>7} {'CPU us/msg':>10}"
    lines = [head]
    short = [r for r in rows if r.get("expected") and r["delivered"] < r["expected"]]
    for r in rows:
        cells = [r["mode"], r["offered_rate"], r["delivered"], r["msgs_per_s"], r["events_per_s"]]
        cells += [r["p50_ms"], r["p99_ms"], r["max_ms"], r["bridge_cpu_percent"], r["bridge_rss_mb"]]
        cells += [r["cpu_us_per_msg"]]
        lines.append(
            "{!s:7} {!s:>8} {!s:>9} {!s:>8} {!s:>9} {!s:>8} {!s:>8} {!s:>8} {!s:>6} {!s:>7} {!s:>10}".format(
                *cells
            )
        )
    lines += [
        f"  {r['mode']} at {r['offered_rate']}: {r['expected'] - r['delivered']} of {r['expected']} messages "
        "never arrived (refused, or lost): its figures count only those that did"
        for r in short
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot written to {path}: matplotlib is not installed (pip install -e '.[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for mode, colour in (("raw", "tab:grey"), ("relay", "tab:orange"), ("bridge", "tab:blue")):
        open_loop = sorted(
            (r for r in rows if r["mode"] == mode and r["offered_rate"] != "max"),
            key=lambda r: r["offered_rate"],
        )
        closed = [r for r in rows if r["mode"] == mode and r["offered_rate"] == "max"]
        x = [r["offered_rate"] for r in open_loop]
        top.plot(x, [r["msgs_per_s"] for r in open_loop], "o-", color=colour, label=f"{mode}, open loop")
        for r in closed:
            top.axhline(r["msgs_per_s"], color=colour, linestyle="--", label=f"{mode}, closed loop max")
        bottom.plot(x, [r["p50_ms"] for r in open_loop], "o-", color=colour, label=f"{mode} p50")
        bottom.plot(x, [r["p99_ms"] for r in open_loop], "s--", color=colour, label=f"{mode} p99")
    top.set_ylabel("delivered chat messages/s")
    top.set_xscale("log")
    top.legend(fontsize=8)
    bottom.set_ylabel("send -> delivery latency (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("offered load (messages/s)")
    bottom.legend(fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def closed_loop(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["mode"]: r for r in rows if r["offered_rate"] == "max"}


def targets(
    rows: list[dict[str, Any]], embedded_rows: list[dict[str, Any]], rate: float, half: int
) -> list[tuple[str, str, bool | None]]:
    """Every target as (target, measured, met): None when the run did not measure it."""
    closed = closed_loop(rows)
    bridge, raw, relay = closed["bridge"], closed["raw"], closed.get("relay")
    out: list[tuple[str, str, bool | None]] = []
    cpu = bridge["cpu_us_per_msg"]
    out.append(
        ("bridge CPU per delivered chat message <= 100 us", f"{cpu} us", cpu is not None and cpu <= 100)
    )
    ratio = bridge["msgs_per_s"] / raw["msgs_per_s"]
    out.append(
        (
            "closed loop >= 0.25 x the raw relay",
            f"{bridge['msgs_per_s']:.0f} / {raw['msgs_per_s']:.0f} = {ratio:.2f}",
            ratio >= 0.25,
        )
    )
    if relay is not None:
        ratio = bridge["msgs_per_s"] / relay["msgs_per_s"]
        out.append(
            (
                "closed loop >= 0.8 x the same-shape relay",
                f"{bridge['msgs_per_s']:.0f} / {relay['msgs_per_s']:.0f} = {ratio:.2f}",
                ratio >= 0.8,
            )
        )
    else:
        out.append(("closed loop >= 0.8 x the same-shape relay", "not run (--no-relay)", None))
    for offered, limit, name in (
        (rate, 2.0, f"{rate:g} msg/s"),
        (half, 10.0, f"50 % of the max ({half} msg/s)"),
    ):
        row = next((r for r in rows if r["mode"] == "bridge" and r["offered_rate"] == offered), None)
        if row is None:
            out.append((f"p99 send->deliver <= {limit:g} ms at {name}", "not run", None))
            continue
        kept_up = row["delivered"] == row["expected"] and row["msgs_per_s"] >= 0.95 * offered
        measured = f"{row['p99_ms']} ms (p50 {row['p50_ms']}, {row['msgs_per_s']:.0f} msg/s delivered)"
        out.append(
            (f"p99 send->deliver <= {limit:g} ms at {name}", measured, kept_up and row["p99_ms"] <= limit)
        )
    emb = closed_loop(embedded_rows) if embedded_rows else {}
    if "bridge" in emb and "raw" in emb and emb["raw"]["msgs_per_s"]:
        ratio = emb["bridge"]["msgs_per_s"] / emb["raw"]["msgs_per_s"]
        measured = f"{emb['bridge']['msgs_per_s']:.0f} / {emb['raw']['msgs_per_s']:.0f} = {ratio:.2f}"
        measured += f" ({emb['bridge']['cpu_us_per_msg']} us CPU per message)"
        out.append(("embedded mode >= 0.5 x amqtt's own raw relay", measured, ratio >= 0.5))
    else:
        out.append(("embedded mode >= 0.5 x amqtt's own raw relay", "not run (--no-embedded)", None))
    return out


def print_targets(rows: list[tuple[str, str, bool | None]]) -> None:
    width = max(len(t) for t, _, _ in rows)
    print("targets (this run):")
    for target, measured, met in rows:
        verdict = "not measured" if met is None else "met" if met else "NOT MET"
        print(f"  {target:{width}}  {measured:50}  {verdict}")


def embedded_phase(
    messages: int, users: int, options: tuple[str, ...], workdir: Path
) -> list[dict[str, Any]]:
    """The closed loop on the embedded broker: amqtt's own raw relay (the same broker code in a process
    of its own, without topic rules, which let clients publish only commands), then the bridge in it."""
    amqtt, port = start_amqtt()
    try:
        pairs = [(f"u{i}", f"u{i + 1}", "") for i in range(0, users, 2)]
        rows = [run("raw", port, pairs, messages, 0, amqtt.pid)]
    finally:
        amqtt.terminate()
        amqtt.wait(30)
    bridge, port = start_embedded(f"sqlite:///{workdir}/embedded.sqlite3", *options)
    try:
        pairs = setup_conversations(port, users)
        rows.append(run("bridge", port, pairs, messages, 0, bridge.pid))
    finally:
        bridge.terminate()
        bridge.wait(30)
    return rows


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, about a minute")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--messages", type=int, help="per sender, closed loop (default 2000; quick 300)")
    parser.add_argument("--seconds", type=float, help="per open-loop rate (default 8; quick 2)")
    parser.add_argument("--rate", type=float, default=500, help="a fixed rate, besides 25/50/75%% of the max")
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--embedded", action="store_true", help="every phase on the embedded amqtt broker")
    where.add_argument("--no-embedded", action="store_true", help="skip the embedded broker's phase")
    parser.add_argument(
        "--client",
        choices=["mqttc", "paho"],
        help="the bridge's MQTT client (`serve --mqtt-client`) and the relay's library (default: mqttc)",
    )
    parser.add_argument("--no-relay", action="store_true", help="skip the same-shape relay")
    parser.add_argument("--json", type=Path, default=Path("bench/results/throughput.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/throughput.png"))
    args = parser.parse_args()
    messages = args.messages or (300 if args.quick else 2000)
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    workdir = Path(tempfile.mkdtemp(prefix="chat-throughput-"))
    database_url = args.database_url or f"sqlite:///{workdir}/bench.sqlite3"
    broker = None
    library = args.client or "mqttc"
    load_before = load_average()
    # no HTTP server: its default port may be taken by another bridge on the machine
    options = ("--rate-limit", "0", "--cost-limit", "0", "--http-listen", "off")
    options += ("--mqtt-client", args.client) if args.client else ()
    amqtt = None
    if args.embedded:
        bridge, port = start_embedded(database_url, *options)
        # the raw relay on amqtt alone: the embedded broker's rules let clients publish only commands
        amqtt, raw_port = start_amqtt()
        raw_pid: int | None = amqtt.pid
    else:
        broker, port = start_mosquitto(workdir)
        bridge = start_bridge(port, database_url, *options)
        raw_port, raw_pid = port, None
    storage = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite"
    title = f"{args.users} users in {args.users // 2} direct pairs, QoS 1, {storage}, " + (
        "embedded amqtt broker" if args.embedded else "Mosquitto (tcp_nodelay)"
    )
    title += f", bridge client {args.client or 'default'}"
    relay = None
    embedded_rows: list[dict[str, Any]] = []
    try:
        pairs = setup_conversations(port, args.users)
        if not args.no_relay and not args.embedded:  # the embedded broker lets only the bridge publish events
            relay = start_relay(workdir, port, pairs, library)
        senders = len(pairs)
        rows = [run("raw", raw_port, pairs, messages, 0, raw_pid)]
        if relay is not None:
            rows.append(run("relay", port, pairs, messages, 0, relay.pid))
        rows.append(run("bridge", port, pairs, messages, 0, bridge.pid))
        top = rows[-1]["msgs_per_s"]
        half = round(top * 0.5)
        rates = sorted({args.rate, round(top * 0.25), half, round(top * 0.75)})
        for rate in rates:
            per_sender = max(1, round(rate * seconds / senders))
            if not args.quick or rate == args.rate:
                rows.append(run("raw", raw_port, pairs, per_sender, rate, raw_pid))
            if relay is not None and rate == args.rate:
                rows.append(run("relay", port, pairs, per_sender, rate, relay.pid))
            rows.append(run("bridge", port, pairs, per_sender, rate, bridge.pid))
    finally:
        for proc in (bridge, relay, amqtt):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        if broker is not None:
            broker.terminate()
    if args.embedded:
        embedded_rows = rows
    elif not args.no_embedded:
        # fewer messages: the embedded bridge is the slowest phase
        embedded_rows = embedded_phase(
            min(messages, 150 if args.quick else 500), args.users, options, workdir
        )
    load_after = load_average()
    closed = closed_loop(rows)
    bridge_max, raw_max = closed["bridge"]["msgs_per_s"], closed["raw"]["msgs_per_s"]
    ratio = bridge_max / raw_max
    print(title)
    print(f"load average before {load_before}, after {load_after} (1, 5, 15 min; {os.cpu_count()} cores)")
    print(table(rows))
    if embedded_rows and not args.embedded:
        print("embedded amqtt broker (`chat-bridge serve --listen`), closed loop:")
        print(table(embedded_rows))
    print(f"closed loop: bridge {bridge_max} msg/s / raw relay {raw_max} msg/s = {ratio:.2f}")
    result: dict[str, Any] = {
        "title": title,
        "quick": args.quick,
        "load_average": {"before": load_before, "after": load_after},
        "rows": rows,
        "embedded_rows": embedded_rows,
        "ratio": round(ratio, 3),
    }
    if "relay" in closed:
        relay_max = closed["relay"]["msgs_per_s"]
        result["relay_ratio"] = round(bridge_max / relay_max, 3)
        print(
            f"closed loop: bridge {bridge_max} msg/s / same-shape relay ({library}) {relay_max} msg/s"
            f" = {bridge_max / relay_max:.2f}"
        )
    print(
        f"bridge CPU per delivered chat message (closed loop): {closed['bridge']['cpu_us_per_msg']} us"
        + f" ({', '.join(f'{k} {v}' for k, v in closed['bridge']['thread_us_per_msg'].items())})"
        + (f"; relay: {closed['relay']['cpu_us_per_msg']} us" if "relay" in closed else "")
    )
    checked = targets(rows, embedded_rows, args.rate, half)
    result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in checked]
    print_targets(checked)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    plot(rows, title, args.plot)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
