"""Soak: the bridge's memory over a long run at a steady load.

Starts Mosquitto and the bridge (SQLite), sets up the same direct pairs as bench/throughput.py and
sends at a fixed rate (default 1,500 msg/s, about half of the closed-loop maximum measured here) for
`--minutes`, sampling the bridge's RSS every 10 s. Prints the samples, then the first and last
minute's averages and the drift between them (target: within ±10 %), with the run's latency.

    python bench/soak.py [--minutes 10] [--rate 1500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import start_bridge, start_mosquitto
from throughput import proc_stats, run, setup_conversations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1500)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chat-soak-"))
    broker, port = start_mosquitto(workdir)
    bridge = start_bridge(port, f"sqlite:///{workdir}/soak.sqlite3", "--rate-limit", "0", "--cost-limit", "0")
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - started, proc_stats(bridge.pid)[1] / 2**20))
            stop.wait(10)

    try:
        pairs = setup_conversations(port, args.users)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        per_sender = round(args.rate * args.minutes * 60 / len(pairs))
        result = run("bridge", port, pairs, per_sender, args.rate, bridge.pid)
        stop.set()
        sampler.join()
    finally:
        bridge.terminate()
        bridge.wait(30)
        broker.terminate()
    print(f"{'seconds':>8} {'RSS MB':>7}")
    for t, rss in samples:
        print(f"{t:8.0f} {rss:7.1f}")
    warm = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]  # skip the first minute
    first, last = statistics.mean(warm[:6]), statistics.mean(warm[-6:])
    drift = (last - first) / first * 100
    print(
        f"{args.minutes:g} min at {args.rate:g} msg/s: delivered {result['delivered']}"
        f" of {result['expected']}, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms,"
        f" bridge CPU {result['bridge_cpu_percent']} %"
    )
    print(
        f"RSS: after warm-up {first:.1f} MB, last minute {last:.1f} MB, drift {drift:+.1f} % (target ±10 %)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"samples": samples, "result": result, "drift_percent": round(drift, 2)}, indent=2)
        )


if __name__ == "__main__":
    main()
