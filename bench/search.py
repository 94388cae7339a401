"""Search latency over 1,000,000 messages, SQLite (FTS5) and PostgreSQL (tsvector + GIN).

Builds each database at the newest schema, bulk-loads `--messages` messages (bodies of 6-14 words
drawn from a Zipf-distributed vocabulary of 30,000, like text), then times `search-messages`
commands through the service (parse, the handler, the store, the answer), as a user in 20 group
conversations and global sees them: 100,000 messages in global, the rest spread over 900 groups.
Queries are one or two words, drawn by the same frequencies (people search for words that occur).

    python bench/search.py [--messages 1000000] [--queries 300] [--databases sqlite,postgres]

PostgreSQL: a scratch database on CHAT_BRIDGE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1),
dropped afterwards. Prints p50/p90/p99 per database and query shape, and the result counts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from sqlalchemy.engine import Engine, make_url

from bridge import protocol as p
from bridge.core import Context
from bridge.model import words
from bridge.search import search_messages
from bridge.service import Inbound, Service
from bridge.sql import SqlUnitOfWork, init_db, make_engine

PG_ADMIN = os.environ.get("CHAT_BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
VOCABULARY = 30_000
GROUPS = 900
MINE = 20  # groups the searching user takes part in
GLOBAL_SHARE = 0.1
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "so", "ta", "vi", "be", "do", "fu", "ga", "hi", "jo", "pe", "zu"]


def vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    found: set[str] = set()
    while len(found) < VOCABULARY:
        found.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    vocab = sorted(found)
    rng.shuffle(vocab)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(VOCABULARY)))
    return vocab, weights


def conversation_of(i: int, n: int) -> str:
    if i < int(n * GLOBAL_SHARE):
        return "global"
    return f"g{i % GROUPS}"


def rows(n: int, rng: random.Random) -> Iterator[tuple[str, str, int, str, int]]:
    """(message_id, conversation_id, seq, body, created_ms) in creation order."""
    vocab, weights = vocabulary(rng)
    seqs: dict[str, int] = {}
    order = list(range(n))
    rng.shuffle(order)  # global and the groups interleaved in time
    for t, i in enumerate(order):
        cid = conversation_of(i, n)
        seq = seqs[cid] = seqs.get(cid, 0) + 1
        body = " ".join(rng.choices(vocab, cum_weights=weights, k=rng.randint(6, 14)))
        yield f"m{i}", cid, seq, body.capitalize() + ".", 1_700_000_000_000 + t * 10


def setup_conversations(conn: Any, seqs: dict[str, int]) -> None:
    conn.exec_driver_sql("INSERT INTO users (user_id, display_name, created_ms) VALUES ('me', NULL, 0)")
    for g in range(GROUPS):
        cid = f"g{g}"
        conn.exec_driver_sql(
            "INSERT INTO conversations (conversation_id, kind, owner_id, created_ms, last_seq, last_rev) "
            f"VALUES ('{cid}', 'group', 'other', 0, {seqs.get(cid, 0)}, {seqs.get(cid, 0)})"
        )
        conn.exec_driver_sql(f"INSERT INTO participants VALUES ('{cid}', 'other')")
        if g < MINE:
            conn.exec_driver_sql(f"INSERT INTO participants VALUES ('{cid}', 'me')")
    conn.exec_driver_sql(
        f"UPDATE conversations SET last_seq = {seqs.get('global', 0)}, last_rev = {seqs.get('global', 0)} "
        "WHERE conversation_id = 'global'"
    )


def load_sqlite(engine: Engine, n: int, rng: random.Random) -> None:
    raw = engine.raw_connection()
    cur = raw.cursor()
    cur.execute("BEGIN")
    seqs: dict[str, int] = {}
    batch: list[tuple[Any, ...]] = []
    search: list[tuple[int, str]] = []

    def flush() -> None:
        cur.executemany("INSERT INTO message_search(rowid, words) VALUES (?, ?)", search)
        cur.executemany(
            "INSERT INTO messages (message_id, conversation_id, seq, sender_id, body, created_ms, rev, "
            "reactions, search_rowid) VALUES (?, ?, ?, 'other', ?, ?, ?, '{}', ?)",
            batch,
        )
        batch.clear()
        search.clear()

    for mid, cid, seq, body, ms in rows(n, rng):
        seqs[cid] = seq
        batch.append((mid, cid, seq, body, ms, seq, ms << 12))  # the store's rowid rule (1 per ms here)
        search.append((ms << 12, " ".join(words(body))))
        if len(batch) == 20_000:
            flush()
    flush()
    cur.execute("COMMIT")
    raw.close()
    with engine.begin() as conn:
        setup_conversations(conn, seqs)
    with engine.connect() as conn:
        conn.exec_driver_sql("INSERT INTO message_search(message_search) VALUES ('optimize')")
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def load_postgres(engine: Engine, n: int, rng: random.Random) -> None:
    raw = engine.raw_connection()
    conn: Any = raw.dbapi_connection
    seqs: dict[str, int] = {}
    with conn.cursor() as cur:
        cur.execute("DROP INDEX ix_messages_search")
        cur.execute(
            "CREATE TEMP TABLE staging (message_id text, conversation_id text, seq bigint, body text, "
            "created_ms bigint, words text)"
        )
        with cur.copy("COPY staging FROM STDIN") as copy:
            for mid, cid, seq, body, ms in rows(n, rng):
                seqs[cid] = seq
                copy.write_row((mid, cid, seq, body, ms, " ".join(words(body))))
        cur.execute(
            "INSERT INTO messages (message_id, conversation_id, seq, sender_id, body, created_ms, rev, "
            "reactions, search_vector) SELECT message_id, conversation_id, seq, 'other', body, created_ms, "
            "seq, '{}', to_tsvector('simple'::regconfig, words) FROM staging"
        )
        cur.execute("CREATE INDEX ix_messages_search ON messages USING gin (search_vector)")
    conn.commit()
    raw.close()
    with engine.begin() as c:
        setup_conversations(c, seqs)
    with engine.connect() as c:
        c.exec_driver_sql("ANALYZE")
        c.commit()


def queries(count: int, rng: random.Random) -> list[str]:
    vocab, weights = vocabulary(random.Random(1))  # the same vocabulary as the data
    out = []
    for i in range(count):
        k = 1 if i % 3 else 2
        out.append(" ".join(rng.choices(vocab, cum_weights=weights, k=k)))
    return out


def pct(xs: list[float], p: float) -> float:
    return round(sorted(xs)[min(len(xs) - 1, int(p * len(xs)))], 2)


def measure(engine: Engine, qs: list[str]) -> dict[str, Any]:
    """`search` times the handler and the store inside one read (the search itself); `command` the
    whole command through the service, which also commits its answer to the outbox (SQLite:
    synchronous=FULL, so an fsync per command on this disk)."""
    uow = SqlUnitOfWork(engine)
    service = Service(uow, epoch="bench")
    ctx_ids = itertools.count()
    timings: dict[int, list[float]] = {1: [], 2: []}
    found: list[int] = []
    for warm, q in [(True, q) for q in qs[:20]] + [(False, q) for q in qs]:
        with uow.reading() as store:
            ctx = Context(store, "me", 0, lambda prefix: f"{prefix}{next(ctx_ids)}")
            started = time.perf_counter()
            search_messages(p.SearchMessages(query=q), ctx)
            took = (time.perf_counter() - started) * 1000
        if not warm:
            timings[len(q.split())].append(took)
            found.append(len(ctx.out[0].payload.data.messages))  # type: ignore[attr-defined]
    commands = []
    for q in qs[:100]:
        started = time.perf_counter()
        (answer,) = service.handle(Inbound("me", "search-messages", orjson.dumps({"query": q})))
        commands.append((time.perf_counter() - started) * 1000)
        assert answer.payload.model_dump()["type"] == "search-results"
    every = timings[1] + timings[2]
    return {
        "queries": len(every),
        "search_p50_ms": pct(every, 0.5),
        "search_p90_ms": pct(every, 0.9),
        "search_p99_ms": pct(every, 0.99),
        "one_word_p50_ms": pct(timings[1], 0.5),
        "two_words_p50_ms": pct(timings[2], 0.5),
        "command_p50_ms": pct(commands, 0.5),
        "command_p99_ms": pct(commands, 0.99),
        "full_pages": sum(1 for f in found if f == 20),
        "empty": sum(1 for f in found if f == 0),
    }


@contextmanager
def scratch_postgres() -> Iterator[str]:
    import psycopg

    name = f"chat_bridge_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(kind: str, url: str, n: int, qs: list[str]) -> dict[str, Any]:
    engine = make_engine(url)
    init_db(engine, 0)
    started = time.perf_counter()
    (load_sqlite if kind == "sqlite" else load_postgres)(engine, n, random.Random(1))
    loaded = time.perf_counter() - started
    result = {"database": kind, "messages": n, "load_s": round(loaded, 1), **measure(engine, qs)}
    engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--databases", default="sqlite,postgres")
    args = parser.parse_args()
    qs = queries(args.queries, random.Random(2))
    for kind in args.databases.split(","):
        if kind == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                print(orjson.dumps(run(kind, f"sqlite:///{tmp}/bench.sqlite3", args.messages, qs)).decode())
        else:
            with scratch_postgres() as url:
                print(orjson.dumps(run(kind, url, args.messages, qs)).decode())
        sys.stdout.flush()


if __name__ == "__main__":
    main()
