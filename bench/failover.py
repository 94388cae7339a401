"""Failover: how long a chat stalls when the NATS node a client is connected to dies.

A 3-node NATS cluster, one worker (on node 2) over PostgreSQL, and two SDK clients: alice on node 1
with `fallbacks=` the other two, bob on node 3. alice sends a numbered message every 0.2 s; after
3 s node 1 is SIGKILLed. It prints, per round, the longest time bob received nothing, the time from
the kill to the first message bob got that alice sent after it, and whether every message arrived
once and in order. `--max-delay` sets the SDK's longest reconnect delay (paho's backoff doubles
from 1 s up to it) for a comparison in one run:

    python bench/failover.py [--rounds 2] [--max-delay 30,5]

Needs nats-server (2.9) and PostgreSQL (CHAT_BRIDGE_TEST_POSTGRES; a scratch database per round).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from scaleout import USER_PW, WorkerProc, nats_cluster, scratch_database

from chat_bridge import errors
from chat_bridge.client import Client

PACE = 0.2
SECONDS = 20.0
KILL_AT = 3.0


def one_round(max_delay: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="chat-failover-"))
    with scratch_database("chat_failover") as database_url:
        cluster = nats_cluster(workdir / "nats", ["alice", "bob"], 3, 16)
        ports = [n.mqtt_port for n in cluster.nodes]
        worker = WorkerProc(cluster, database_url, node=1)
        try:
            bob = Client("bob", port=ports[2], password=USER_PW, timeout=60)
            bob.connect()
            alice = Client(
                "alice",
                port=ports[0],
                password=USER_PW,
                timeout=60,
                fallbacks=[f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"],
            )
            alice._session.mqtt.reconnect_delay_set(1, max_delay)
            alice.connect()
            conv = alice.create_direct("bob")["conversation_id"]
            got: list[tuple[float, int]] = []
            lock = threading.Lock()

            def arrived(event: object) -> None:
                body = event.message["body"]  # type: ignore[attr-defined]
                with lock:
                    got.append((time.monotonic(), int(body.split()[1])))

            bob.on("message-added", arrived)
            sent_at: dict[int, float] = {}
            start = time.monotonic()
            killed_at = None
            n = 0
            while time.monotonic() - start < SECONDS:
                if killed_at is None and time.monotonic() - start >= KILL_AT:
                    cluster.nodes[0].kill()
                    killed_at = time.monotonic()
                sent_at[n] = time.monotonic()
                while True:  # sent again (same client_msg_id) until answered
                    try:
                        alice.send_message(conv, f"alice {n}", client_msg_id=f"m{n}", timeout=10)
                        break
                    except errors.RequestTimeout:
                        continue
                n += 1
                time.sleep(max(0.0, sent_at[n - 1] + PACE - time.monotonic()))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    if len({x for _, x in got}) >= n:
                        break
                time.sleep(0.1)
            alice.close()
            bob.close()
        finally:
            worker.stop()
            cluster.stop()
    with lock:
        times = [t for t, _ in got]
        numbers = [x for _, x in got]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert killed_at is not None
    after = [t for t, x in got if sent_at.get(x, 0) >= killed_at]
    return {
        "max_delay_s": max_delay,
        "sent": n,
        "received": len(numbers),
        "once_in_order": numbers == list(range(n)),
        "longest_gap_s": round(max(gaps), 2) if gaps else None,
        "kill_to_first_after_s": round(min(after) - killed_at, 2) if after else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-delay", default="30,5", help="the SDK's longest reconnect delays to compare")
    args = parser.parse_args()
    delays = [int(d) for d in args.max_delay.split(",")]
    for r in range(args.rounds):
        for d in delays:  # interleaved: the machine's load drifts
            print(f"round {r + 1}: {one_round(d)}", flush=True)


if __name__ == "__main__":
    main()
