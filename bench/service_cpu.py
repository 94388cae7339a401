"""CPU per chat message on the database thread: the service's apply path as the pipeline runs it.

The pipeline hands each batch of admitted commands to `Service.handle_batch(items, published,
admitted=True)` on its database thread, `published` being the batches the broker acknowledged since
(their outbox rows are deleted in the same transaction). This script does the same, with the service
`chat-bridge serve` builds (`cli.make_service`, default settings but a cost budget too large to
refuse) on a SQLite file (WAL, background checkpoints), over 10 users each in a direct conversation
with an active session: every `send-message` (the payload bench/throughput.py sends) makes three
events (the sender's answer, the partner's inbox, the conversation's topic).

It prints process CPU time (time.process_time) per message for batches of 1 and of 100, the median
of several rounds, and `uptime`:

    python bench/service_cpu.py                       # this tree
    python bench/service_cpu.py --profile 100         # cProfile top list, batches of 100
    python bench/service_cpu.py --trees OLD NEW       # interleaved rounds of two source trees
    valgrind --tool=callgrind python bench/service_cpu.py --fixed 100 --messages 2000

`--fixed B` runs one measured pass of batches of B (for callgrind: instruction counts are steady on a
busy machine; divide the program's total, minus a run with `--messages 0`, by the message count).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("SERVICE_CPU_TREE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

T0 = 1_700_000_000_000
USERS = 10


def build(directory: str):
    from sqlalchemy import insert

    from bridge.cli import make_service
    from bridge.config import Settings
    from bridge.model import direct_key
    from bridge.sql import SqlUnitOfWork, conversations, init_db, make_engine, participants, sessions, users

    url = f"sqlite:///{directory}/service-cpu.sqlite3"
    engine = make_engine(url, background_checkpoints=True)
    init_db(engine, T0)
    names = [f"u{i:02d}" for i in range(USERS)]
    with engine.begin() as conn:
        conn.execute(insert(users), [{"user_id": n, "display_name": None, "created_ms": T0} for n in names])
        conn.execute(
            insert(sessions),
            [{"user_id": n, "session_id": "s", "epoch": "bench", "started_ms": T0} for n in names],
        )
        pairs = [(names[i], names[i + 1]) for i in range(0, USERS - 1, 2)]
        conn.execute(
            insert(conversations),
            [
                {
                    "conversation_id": f"d{i}",
                    "kind": "direct",
                    "direct_key": direct_key(a, b),
                    "created_ms": T0,
                    "last_seq": 0,
                }
                for i, (a, b) in enumerate(pairs)
            ],
        )
        conn.execute(
            insert(participants),
            [{"conversation_id": f"d{i}", "user_id": u} for i, pair in enumerate(pairs) for u in pair],
        )
    huge = 10**12  # charged as always, never refusing: the rounds send far faster than any one user may
    settings = Settings(database_url=url, cost_limit=huge, cost_burst=huge, cost_total=huge, rate_limit=0)
    return make_service(settings, SqlUnitOfWork(engine), epoch="bench")


class Driver:
    """Batches of send-message commands through handle_batch, as the pipeline sends them."""

    def __init__(self, service) -> None:
        from bridge.service import Inbound

        self.service = service
        self.inbound = Inbound
        self.n = 0
        self.published: list[str] = []

    def items(self, size: int) -> list:
        out = []
        for _ in range(size):
            pair = self.n % (USERS // 2)
            sender = 2 * pair + (self.n // (USERS // 2)) % 2  # both sides of each pair talk
            body = f"{time.time():.6f}|{self.n}"
            payload = orjson.dumps({"conversation_id": f"d{pair}", "body": body})
            out.append(self.inbound(f"u{sender:02d}", "send-message", payload))
            self.n += 1
        return out

    def run(self, size: int, messages: int) -> float:
        """CPU seconds per message over `messages` messages in batches of `size` (payloads built outside
        the timing)."""
        batches = [self.items(size) for _ in range(max(1, messages // size))]
        started = time.process_time()
        for items in batches:
            batch = self.service.handle_batch(items, self.published, admitted=True)
            assert len(batch.entries) == 3 * len(items), "every message makes three events"
            self.published = [batch.id]  # acknowledged by the broker before the next batch
        return (time.process_time() - started) / (len(batches) * size)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime: unavailable"


def measure(rounds: int, messages: dict[int, int]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="chat-service-cpu-") as directory:
        driver = Driver(build(directory))
        for size in messages:  # warm up: statements compiled, caches filled
            driver.run(size, min(200, messages[size]))
        out: dict[str, list[float]] = {str(size): [] for size in messages}
        for _ in range(rounds):
            for size, count in messages.items():
                out[str(size)].append(driver.run(size, count) * 1e6)
        return out


def profile(size: int, messages: int, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chat-service-cpu-") as directory:
        driver = Driver(build(directory))
        driver.run(size, 200)
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        per = driver.run(size, messages)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        print(f"batches of {size}: {per * 1e6:.1f} µs/msg under cProfile ({uptime()})")
        print(text.getvalue())


def interleave(trees: list[str], rounds: int, args: argparse.Namespace) -> None:
    """Each round runs every tree once, in its own process, alternating the order."""
    results: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    loads = [uptime()]
    for r in range(rounds):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            env = {**os.environ, "SERVICE_CPU_TREE": str(Path(tree).resolve())}
            cmd = [
                sys.executable,
                __file__,
                "--rounds",
                "3",
                "--json-only",
                "--messages-1",
                str(args.messages_1),
                "--messages-100",
                str(args.messages_100),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            for size, values in json.loads(done.stdout).items():
                results[tree].setdefault(size, []).append(statistics.median(values))
        loads.append(uptime())
    print(
        f"interleaved, {rounds} rounds (median of each process's 3, then of the rounds), µs CPU per message"
    )
    print(f"{'tree':<40} {'batch of 1':>11} {'batch of 100':>13}")
    for tree in trees:
        row = results[tree]
        cells = [
            f"{statistics.median(row[s]):>11.1f}" if s == "1" else f"{statistics.median(row[s]):>13.1f}"
            for s in ("1", "100")
        ]
        print(
            f"{tree:<40} {' '.join(cells)}   rounds: "
            + "; ".join(f"{s}: " + " ".join(f"{v:.0f}" for v in row[s]) for s in ("1", "100"))
        )
    print("load: " + loads[0])
    print("      " + loads[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages-1", type=int, default=1000, help="messages per round in batches of 1")
    parser.add_argument("--messages-100", type=int, default=3000, help="messages per round in batches of 100")
    parser.add_argument("--profile", type=int, metavar="BATCH", help="cProfile top list for this batch size")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--fixed", type=int, metavar="BATCH", help="one pass, no warm-up (for callgrind)")
    parser.add_argument("--messages", type=int, default=2000, help="with --fixed/--profile: messages")
    parser.add_argument("--trees", nargs="+", help="source trees to compare, interleaved")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.trees:
        interleave(args.trees, args.rounds, args)
        return
    if args.profile:
        profile(args.profile, args.messages, args.top)
        return
    if args.fixed:
        with tempfile.TemporaryDirectory(prefix="chat-service-cpu-") as directory:
            driver = Driver(build(directory))
            if args.messages:
                print(f"{driver.run(args.fixed, args.messages) * 1e6:.1f} µs/msg")
        return
    results = measure(args.rounds, {1: args.messages_1, 100: args.messages_100})
    if args.json_only:
        print(json.dumps(results))
        return
    print(f"tree {ROOT}: µs CPU per message (median of {args.rounds} rounds; rounds in brackets)")
    for size, values in results.items():
        print(
            f"  batch of {size:>3}: {statistics.median(values):7.1f}  ["
            + " ".join(f"{v:.0f}" for v in values)
            + "]"
        )
    print(uptime())


if __name__ == "__main__":
    main()
