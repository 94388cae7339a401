"""The embedded broker's closed loop alone, beside amqtt's own raw relay, in one run (a shorter
measurement than `bench/throughput.py --embedded`).

Each round runs amqtt's raw relay (paho to paho through amqtt alone, in a process of its own, no
topic rules), then `chat-bridge serve` with its embedded broker (SQLite in a temporary folder), for
the same traffic shape as bench/throughput.py (U users in U/2 direct pairs, QoS 1, closed loop).
With `--compare NAME=DIR` (a checkout of another version of the project, e.g. from `git archive`;
may be given more than once) each round also runs that version's `chat-bridge serve`, interleaved
(the order turned every round), so the versions share the machine's load. Prints messages/s, the
bridge's CPU per delivered message (process CPU time / messages, and per thread), the ratio to the
raw relay, and `uptime` before and after.

    python bench/embedded.py [--messages 300] [--users 20] [--rounds 2] [--compare NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, free_port, start_amqtt, wait_for_line
from throughput import run, setup_conversations


def serve(root: Path, database_url: str) -> tuple[subprocess.Popen[str], int]:
    """`chat-bridge serve` from the checkout `root`, with its embedded broker on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--ws-listen",
            "off",
            "--database-url",
            database_url,
            "--rate-limit",
            "0",
            "--http-listen",
            "off",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    wait_for_line(proc, "bridge online")
    return proc, port


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=300, help="per sender (default 300)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=DIR", help="another version's checkout"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chat-embedded-"))
    versions = [("this", ROOT)]
    for spec in args.compare:
        name, _, folder = spec.partition("=")
        versions.append((name, Path(folder).resolve()))
    print(f"start: {uptime()}")
    rows: list[dict[str, Any]] = []
    for n in range(args.rounds):
        amqtt, port = start_amqtt()
        try:
            pairs = [(f"u{i}", f"u{i + 1}", "") for i in range(0, args.users, 2)]
            raw = run("raw", port, pairs, args.messages, 0, amqtt.pid)
        finally:
            amqtt.terminate()
            amqtt.wait(30)
        rows.append({"round": n, "version": "amqtt raw relay", **raw})
        print(
            f"round {n} amqtt raw relay: {raw['msgs_per_s']} msg/s, amqtt CPU {raw['cpu_us_per_msg']} us/msg"
        )
        order = versions if n % 2 == 0 else versions[::-1]
        for name, root in order:
            bridge, port = serve(root, f"sqlite:///{workdir}/{name}-{n}.sqlite3")
            try:
                pairs = setup_conversations(port, args.users)
                got = run("bridge", port, pairs, args.messages, 0, bridge.pid)
            finally:
                bridge.terminate()
                bridge.wait(30)
            rows.append({"round": n, "version": name, **got})
            threads = ", ".join(f"{k} {v}" for k, v in got["thread_us_per_msg"].items())
            print(
                f"round {n} bridge {name}: {got['msgs_per_s']} msg/s"
                f" = {got['msgs_per_s'] / raw['msgs_per_s']:.2f} x the raw relay;"
                f" CPU {got['cpu_us_per_msg']} us/msg ({threads})"
            )
    print(f"end: {uptime()}")


if __name__ == "__main__":
    main()
