"""History stays fast as a conversation grows.

Fills one conversation with N messages (default 1,000,000) and another with
100, then times `get-messages` and `get-prior-messages` through the service
(parse, transaction, keyset query, event building; no MQTT) for the first, a
middle and the last page of each, and prints them side by side.

    python bench/history.py                                   # SQLite in a temp dir
    python bench/history.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from sqlalchemy import insert, update

from bridge.protocol import iso_ms
from bridge.service import Inbound, Service
from bridge.sql import SqlUnitOfWork, conversations, init_db, make_engine, messages, participants, users

PAGE = 50
T0 = 1_767_225_600_000  # 2026-01-01


def fill(engine: object, cid: str, count: int) -> None:
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(
            insert(conversations).values(
                conversation_id=cid, kind="group", owner_id="reader", created_ms=T0, last_seq=0
            )
        )
        conn.execute(insert(participants).values(conversation_id=cid, user_id="reader"))
    chunk = 20_000
    started = time.perf_counter()
    for start in range(1, count + 1, chunk):
        rows = [
            {
                "message_id": f"{cid}-{seq}",
                "conversation_id": cid,
                "seq": seq,
                "sender_id": "reader",
                "body": f"message number {seq} with a body of ordinary length for a chat line",
                "client_msg_id": None,
                "created_ms": T0 + seq * 10,
            }
            for seq in range(start, min(start + chunk, count + 1))
        ]
        with engine.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(insert(messages), rows)
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(
            update(conversations).where(conversations.c.conversation_id == cid).values(last_seq=count)
        )
    print(f"  filled {cid}: {count:,} messages in {time.perf_counter() - started:.1f}s", flush=True)


def timed(service: Service, command: str, fields: dict[str, object], repeat: int) -> tuple[float, int]:
    payload = orjson.dumps({"request_id": "b", **fields})
    times, got = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        out = service.handle(Inbound("reader", command, payload))
        times.append(time.perf_counter() - t)
        data = out[0].payload.model_dump()["data"]
        assert "messages" in data, data
        got = len(data["messages"])
    return statistics.median(times) * 1000, got


def cases(n: int) -> list[tuple[str, str, dict[str, object]]]:
    def iso(seq: int) -> str:
        return iso_ms(T0 + seq * 10)

    return [
        ("get-messages first", "get-messages", {"since_seq": 0}),
        ("get-messages middle", "get-messages", {"since_seq": n // 2}),
        ("get-messages last", "get-messages", {"since_seq": n - PAGE}),
        ("get-messages since ts (middle)", "get-messages", {"since": iso(n // 2)}),
        ("get-prior-messages newest", "get-prior-messages", {}),
        ("get-prior-messages middle", "get-prior-messages", {"before_seq": n // 2}),
        ("get-prior-messages oldest", "get-prior-messages", {"before_seq": PAGE + 1}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='chat-bench-')}/history.sqlite3"
    engine = make_engine(url)
    init_db(engine, T0)
    with engine.begin() as conn:
        conn.execute(insert(users).values(user_id="reader", created_ms=T0))
    print(f"database: {url.split('@')[-1]}")
    fill(engine, "big", args.messages)
    fill(engine, "small", 100)
    service = Service(SqlUnitOfWork(engine), epoch="bench")
    rows = []
    print(
        f"\n{f'query (page of {PAGE})':34} {'1M conv ms' if args.messages == 1_000_000 else 'big ms':>12}"
        f" {'100-msg ms':>11} {'ratio':>6}"
    )
    for (label, command, fields), (_, _, small_fields) in zip(cases(args.messages), cases(100), strict=True):
        big_ms, big_n = timed(
            service, command, {"conversation_id": "big", "limit": PAGE, **fields}, args.repeat
        )
        small_ms, small_n = timed(
            service, command, {"conversation_id": "small", "limit": PAGE, **small_fields}, args.repeat
        )
        ratio = big_ms / small_ms
        rows.append(
            {
                "query": label,
                "big_ms": round(big_ms, 3),
                "small_ms": round(small_ms, 3),
                "ratio": round(ratio, 2),
                "rows_big": big_n,
                "rows_small": small_n,
            }
        )
        print(f"{label:34} {big_ms:12.3f} {small_ms:11.3f} {ratio:6.2f}")
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst ratio {worst:.2f} (target: within 2x) over {args.repeat} runs each (median)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"database": url.split("@")[-1], "messages": args.messages, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
