"""The WAL is copied into the database by a background thread, not by whichever commit fills it."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson

from bridge.service import Inbound, Service
from bridge.sql import SqlUnitOfWork, init_db, make_engine


def fill(engine: object, messages: int) -> None:
    service = Service(SqlUnitOfWork(engine), epoch="e")  # type: ignore[arg-type]
    service.handle(Inbound("alice", "connect", b'{"session_id": "s"}'))
    body = orjson.dumps({"conversation_id": "global", "body": "x" * 2000})
    for _ in range(messages // 50):
        service.handle_batch([Inbound("alice", "send-message", body)] * 50)


def grows(path: Path, beyond: int, timeout: float) -> bool:
    """Waits until the database file itself (not its -wal) is larger than `beyond` bytes."""
    done = threading.Event()
    deadline = threading.Event()
    threading.Timer(timeout, deadline.set).start()
    while not deadline.is_set():
        if path.stat().st_size > beyond:
            done.set()
            break
        deadline.wait(0.05)
    return done.is_set()


def test_background_checkpoints_move_the_wal_into_the_database(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    engine = make_engine(f"sqlite:///{path}", background_checkpoints=True)
    init_db(engine, 1)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0  # commits never checkpoint
    before = path.stat().st_size
    fill(engine, 1000)  # ~2 MB of messages, all of it in the WAL at first
    assert grows(path, before + 1_000_000, timeout=20)


def test_without_them_commits_checkpoint_as_sqlite_does_by_default(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine, 1)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
