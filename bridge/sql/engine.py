"""Engines: SQLite (a file in WAL mode, the default) or PostgreSQL (production), their connection
settings, SQLite's background checkpoints, and the schema's migrations."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import create_engine

from ..model import GLOBAL_ID
from .tables import conversations

log = logging.getLogger(__name__)


def make_engine(url: str, *, background_checkpoints: bool = False) -> Engine:
    """An engine for the URL; SQLite gets WAL, real savepoints and BEGIN IMMEDIATE.

    `background_checkpoints` (SQLite files): a thread copies the WAL into the database every half
    second, instead of whichever commit crosses 1,000 pages doing it while the bridge waits; at
    500 msg/s that commit was the slowest 1 % (bench/throughput.py: p99 3.4 -> 2.2 ms).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        database = engine.url.database
        checkpointing = background_checkpoints and bool(database) and database != ":memory:"

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN/SAVEPOINT reach SQLite as written
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # The journal of a transaction's savepoints (one per command) stays in memory instead of
            # spilling into a temporary file once it outgrows 64 KiB (large batches, long bodies).
            cur.execute("PRAGMA temp_store=MEMORY")
            if checkpointing:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

        if checkpointing:
            assert database is not None
            threading.Thread(
                target=_checkpoints,
                args=(database, weakref.ref(engine)),
                name="sqlite-checkpoints",
                daemon=True,
            ).start()
        return engine
    # No pool_pre_ping (a round trip per transaction): a connection found dead is invalidated by the
    # store and the bridge retries at once on a fresh one (Pipeline._retrying).
    return create_engine(url)


def _checkpoints(path: str, engine: weakref.ref[Engine], every: float = 0.5) -> None:
    """Checkpoints the WAL of `path` on a connection of its own (PASSIVE: never blocks a writer), for as
    long as the engine lives."""
    conn: sqlite3.Connection | None = None
    while engine() is not None:
        try:
            if conn is None:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            _busy, log_frames, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if log_frames == -1:  # opened before the file was switched to WAL: open it again
                conn.close()
                conn = None
        except sqlite3.Error:
            log.warning("WAL checkpoint of %s failed; retrying", path, exc_info=True)
        time.sleep(every)
    if conn is not None:
        conn.close()


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrate(engine: Engine, revision: str = "head") -> None:
    """Brings the schema to `revision` with the Alembic migrations shipped in the package."""
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        tables = inspect(conn).get_table_names()
        if "messages" in tables and "alembic_version" not in tables:
            command.stamp(config, "0001")  # created by create_all before migrations existed
        command.upgrade(config, revision)


def init_db(engine: Engine, now_ms: int) -> None:
    """Migrates the schema to the newest and creates the global conversation when missing."""
    migrate(engine)
    with engine.begin() as conn:
        exists = conn.execute(
            select(conversations.c.conversation_id).where(conversations.c.conversation_id == GLOBAL_ID)
        ).first()
        if exists is None:
            try:
                with conn.begin_nested():
                    conn.execute(
                        insert(conversations).values(
                            conversation_id=GLOBAL_ID, kind="global", created_ms=now_ms, last_seq=0
                        )
                    )
            except IntegrityError:
                pass  # another bridge process created it first
