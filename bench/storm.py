"""Connect storm: N users announce themselves at once; how long until everyone has seen correct presence?

With `--presence broadcast` (the default) each `connect` of a user not yet active sends `user-connected`
to every active user, so a storm of N costs N + N(N+1)/2 inbox events. With `--presence retained` it
costs N `connected` answers and N retained presence updates. One publisher sends the N `connect`
commands; one subscriber on `chat/v1/users/+/inbox` (and `chat/v1/presence/+`) counts what arrives and
stops the clock when every expected event has: the last user's broadcast, or the last presence update.

    python bench/storm.py --presence broadcast --users 200 500 1000
    python bench/storm.py --presence retained --users 1000 5000

A single subscriber here receives every inbox, so it, not the bridge, may be the bottleneck.
"""

from __future__ import annotations

import argparse
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
from harness import start_bridge, start_mosquitto


def storm(users: int, presence: str) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="chat-storm-"))
    # One subscriber receives every inbox here: let Mosquitto queue all of it for that subscriber.
    broker, port = start_mosquitto(workdir, extra=("max_queued_messages 0",))
    bridge = start_bridge(
        port, f"sqlite:///{workdir}/storm.sqlite3", "--rate-limit", "0", "--presence", presence
    )
    counts = {"connected": 0, "presence": 0, "events": 0}
    expected = users + (users * (users + 1) // 2 if presence == "broadcast" else users)
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        counts["events"] += 1
        if b'"type":"connected"' in msg.payload[:30]:
            counts["connected"] += 1
        elif msg.topic.startswith("chat/v1/presence/"):
            counts["presence"] += 1
        if counts["events"] == expected:
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="storm-sub")
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    topics = ["chat/v1/users/+/inbox"] + (["chat/v1/presence/+"] if presence == "retained" else [])
    sub.subscribe([(t, 1) for t in topics])
    subscribed.wait(10)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="storm-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    started = time.monotonic()
    for i in range(users):
        pub.publish(f"chat/v1/users/s{i}/commands/connect", orjson.dumps({"session_id": f"s{i}"}), qos=1)
    settled = done.wait(600)
    seconds = time.monotonic() - started
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    bridge.terminate()
    bridge.wait(30)
    broker.terminate()
    return {
        "users": users,
        "presence": presence,
        "expected": expected,
        "seconds": round(seconds, 2) if settled else float("inf"),
        "events": counts["events"],
        "events_per_s": round(counts["events"] / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--presence", choices=["broadcast", "retained"], default="broadcast")
    args = parser.parse_args()
    print(f"{'presence':>9} {'users':>6} {'seconds':>8} {'events':>9} {'expected':>9} {'events/s':>9}")
    for n in args.users:
        r = storm(n, args.presence)
        cells = (r["presence"], r["users"], r["seconds"], r["events"], r["expected"], r["events_per_s"])
        print("{:>9} {:>6} {:>8} {:>9} {:>9} {:>9}".format(*cells), flush=True)


if __name__ == "__main__":
    main()
