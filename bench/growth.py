"""Growth of cost: what one direct message costs the bridge with 10 and with 10,000 known users.

Each user is known, has an active session and a direct conversation with its neighbour, so every
table the hot path reads (users, sessions, conversations, participants, messages) grows with the user
count. It times the service (parse, transaction, store, events, outbox) without MQTT, whose work per
message does not depend on how many users exist: one message per transaction (light load) and 100 per
transaction (the batches of heavy load). Prints microseconds per message (median of the runs) and the
ratio between the two populations.

    python bench/growth.py [--users 10 10000]

Each population gets its own SQLite file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bridge.model import direct_key
from bridge.service import Inbound, Service
from bridge.sql import (
    SqlUnitOfWork,
    conversations,
    init_db,
    make_engine,
    participants,
    sessions,
    users,
)

T0 = 1_700_000_000_000


def populate(url: str, count: int) -> Service:
    engine = make_engine(url)
    init_db(engine, T0)
    names = [f"u{i:05d}" for i in range(count)]
    with engine.begin() as conn:
        conn.execute(insert(users), [{"user_id": n, "display_name": None, "created_ms": T0} for n in names])
        conn.execute(
            insert(sessions),
            [{"user_id": n, "session_id": "s", "epoch": "bench", "started_ms": T0} for n in names],
        )
        pairs = [(names[i], names[i + 1]) for i in range(0, count - 1, 2)]
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
    return Service(SqlUnitOfWork(engine), epoch="bench")


def per_message_us(service: Service, batch: int, runs: int, count: int) -> float:
    """Median over `runs` transactions of `batch` messages each, spread over the population's pairs."""
    samples = []
    pairs = max(1, count // 2)
    n = 0
    for _ in range(runs):
        items = []
        for _ in range(batch):
            pair = (n * 7919) % pairs  # hop around the population, not one hot row
            items.append(
                Inbound(
                    f"u{2 * pair:05d}",
                    "send-message",
                    orjson.dumps({"conversation_id": f"d{pair}", "body": "hello"}),
                )
            )
            n += 1
        started = time.perf_counter()
        service.handle_batch(items, admitted=True)
        samples.append((time.perf_counter() - started) / batch * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs=2, default=[10, 10_000])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for count in args.users:
        url = f"sqlite:///{tempfile.mkdtemp(prefix='chat-growth-')}/growth.sqlite3"
        service = populate(url, count)
        per_message_us(service, 1, 50, count)  # warm up
        one = per_message_us(service, 1, args.runs, count)
        hundred = per_message_us(service, 100, max(10, args.runs // 10), count)
        rows.append(
            {"users": count, "us_per_msg_batch_1": round(one, 1), "us_per_msg_batch_100": round(hundred, 1)}
        )
    print(f"{'known users':>11} {'µs/msg, 1 per tx':>17} {'µs/msg, 100 per tx':>19}")
    for r in rows:
        print(f"{r['users']:>11} {r['us_per_msg_batch_1']:>17} {r['us_per_msg_batch_100']:>19}")
    if len(rows) == 2:
        print(
            f"ratio {rows[1]['users']} / {rows[0]['users']} users: "
            f"{rows[1]['us_per_msg_batch_1'] / rows[0]['us_per_msg_batch_1']:.2f} (1 per tx), "
            f"{rows[1]['us_per_msg_batch_100'] / rows[0]['us_per_msg_batch_100']:.2f} (100 per tx)"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
