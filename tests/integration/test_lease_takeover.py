"""Taking over the lease of a worker paused in the middle of a statement, on PostgreSQL: the paused
worker's transaction holds the lease row (its batch fenced itself) and is not idle, so PostgreSQL's
idle-in-transaction timeout never ends it. The worker taking over ends its sessions."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine

from bridge.leases import Fenced, Leases
from bridge.worker import _bound_waits

TTL_MS = 500
WAIT = 15.0


def engine_of(url: str, worker_id: str) -> Any:
    engine = create_engine(url)
    _bound_waits(engine, worker_id=worker_id, idle_ms=1000, lock_ms=1000)
    return engine


def test_a_takeover_ends_the_sessions_of_a_worker_paused_mid_statement(postgres_url: str) -> None:
    old_engine, new_engine = engine_of(postgres_url, "w-old"), engine_of(postgres_url, "w-new")
    old = Leases(old_engine, "w-old", ttl_ms=TTL_MS)
    old.ensure(2)
    lease = old.acquire(0)
    assert lease is not None

    # the old worker, in the middle of a batch: fenced (the lease row locked), then a statement that
    # does not end while the worker is stopped (here: one that sleeps)
    running = threading.Event()
    outcome: list[BaseException | None] = []

    def paused_batch() -> None:
        conn = old_engine.raw_connection()
        try:
            cur = conn.cursor()
            old.record(cur, lease, 1, 5)
            running.set()
            cur.execute("SELECT pg_sleep(60)")
            conn.commit()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            conn.close()

    batch = threading.Thread(target=paused_batch, daemon=True)
    batch.start()
    assert running.wait(WAIT)

    new = Leases(new_engine, "w-new", ttl_ms=TTL_MS)
    started = time.monotonic()
    taken = None
    errors: list[str] = []
    while taken is None and time.monotonic() - started < WAIT:
        try:
            taken = new.acquire(0)  # None until the old lease has expired
        except Exception as exc:  # the lease row stays locked: lock_timeout
            errors.append(type(exc).__name__)
    assert taken is not None, f"not taken over in {WAIT:.0f}s ({len(errors)} tries failed: {set(errors)})"
    assert taken.epoch == lease.epoch + 1
    assert taken.applied_seq == 0  # the paused batch never committed
    assert taken.expired_owner == "w-old"

    batch.join(WAIT)
    assert outcome and isinstance(outcome[0], psycopg.OperationalError), outcome  # its session ended
    # and when the old worker runs again, fencing refuses its next batch
    conn = old_engine.raw_connection()
    try:
        with pytest.raises(Fenced):
            old.record(conn.cursor(), lease, 1, 5)
    finally:
        conn.rollback()
        conn.close()
    old_engine.dispose()
    new_engine.dispose()


def test_a_live_owner_keeps_its_sessions(postgres_url: str) -> None:
    engine, other = engine_of(postgres_url, "w-a"), engine_of(postgres_url, "w-b")
    a = Leases(engine, "w-a", ttl_ms=60_000)
    a.ensure(1)
    assert a.acquire(0) is not None
    conn = engine.raw_connection()
    try:
        conn.cursor().execute("SELECT 1")
        assert Leases(other, "w-b", ttl_ms=60_000).acquire(0) is None  # held, not expired
        conn.cursor().execute("SELECT 1")  # this session of the owner was left alone
    finally:
        conn.close()
    engine.dispose()
    other.dispose()
