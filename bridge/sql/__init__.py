"""The SQL store: SQLModel tables, each statement written with SQLAlchemy beside the method that runs
it, compiled once per engine and run on the driver's cursor, one connection per transaction.

    tables.py         the tables, and how their rows become records
    engine.py         engines (SQLite PRAGMAs, WAL checkpoints; PostgreSQL), migrations, init_db
    errors.py         the boundary: driver and SQLAlchemy errors become the store's own
    statements.py     Sql, Listed: statements compiled once per engine (an IN list once per length)
    base.py           one connection: running statements, savepoints, translating errors
    users.py          users and sessions
    conversations.py  conversations and participants
    messages.py       messages: seq and rev, writes, history
    search.py         the search index and its queries
    receipts.py       read markers
    outbox.py         the transactional outbox
    store.py          SqlStore (all of the above) and SqlUnitOfWork
"""

from __future__ import annotations

from .engine import MIGRATIONS, init_db, make_engine, migrate
from .errors import TRANSIENT_ERRORS, TRANSLATION, is_transient, storage_error
from .statements import IN_CHUNK
from .store import SqlStore, SqlUnitOfWork
from .tables import (
    SEARCH_OBJECTS,
    conversations,
    messages,
    outbox,
    participants,
    read_markers,
    sessions,
    users,
)

__all__ = [
    "IN_CHUNK",
    "MIGRATIONS",
    "SEARCH_OBJECTS",
    "TRANSIENT_ERRORS",
    "TRANSLATION",
    "SqlStore",
    "SqlUnitOfWork",
    "conversations",
    "init_db",
    "is_transient",
    "make_engine",
    "messages",
    "migrate",
    "outbox",
    "participants",
    "read_markers",
    "sessions",
    "storage_error",
    "users",
]
