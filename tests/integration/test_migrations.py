"""Schema migrations: they build exactly the models' schema, and upgrades keep every row."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, select
from sqlmodel import SQLModel
from world import World

from bridge.sql import (
    SqlUnitOfWork,
    conversations,
    init_db,
    make_engine,
    messages,
    migrate,
    participants,
    sessions,
    users,
)

FIRST_RELEASE_TABLES = (users, sessions, conversations, participants, messages)


def test_migrations_build_the_models_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    assert diffs == [], diffs


def rows(conn: Any) -> dict[str, list[tuple[Any, ...]]]:
    return {t.name: sorted(tuple(r) for r in conn.execute(select(t)).all()) for t in FIRST_RELEASE_TABLES}


def test_upgrade_from_the_first_release_keeps_every_row(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine, "0001")
    with engine.begin() as conn:
        assert "outbox" not in inspect(conn).get_table_names()
        conn.execute(
            insert(users),
            [{"user_id": u, "display_name": u.title(), "created_ms": 1} for u in ("alice", "bob", "carol")],
        )
        conn.execute(
            insert(sessions),
            [
                {"user_id": "alice", "session_id": "s1", "epoch": "old", "started_ms": 2, "ended_ms": None},
                {"user_id": "bob", "session_id": "s2", "epoch": "old", "started_ms": 2, "ended_ms": 5},
            ],
        )
        for row in [
            {"conversation_id": "global", "kind": "global", "created_ms": 0, "last_seq": 0},
            {
                "conversation_id": "c_dm",
                "kind": "direct",
                "direct_key": "alice/bob",
                "created_ms": 3,
                "last_seq": 25,
            },
            {
                "conversation_id": "c_g",
                "kind": "group",
                "title": "g",
                "owner_id": "alice",
                "created_ms": 3,
                "last_seq": 0,
            },
            {
                "conversation_id": "t_1",
                "kind": "thread",
                "parent_conversation_id": "c_dm",
                "parent_message_id": "old-1",
                "created_ms": 4,
                "last_seq": 0,
            },
        ]:  # one by one: executemany takes its columns from the first row
            conn.execute(insert(conversations).values(**row))
        conn.execute(
            insert(participants),
            [
                {"conversation_id": c, "user_id": u}
                for c, u in (("c_dm", "alice"), ("c_dm", "bob"), ("c_g", "alice"), ("c_g", "carol"))
            ],
        )
        conn.execute(
            insert(messages),
            [
                {
                    "message_id": f"old-{i}",
                    "conversation_id": "c_dm",
                    "seq": i,
                    "sender_id": "alice" if i % 2 else "bob",
                    "body": f"message {i} ✓",
                    "client_msg_id": f"c{i}" if i % 3 else None,
                    "created_ms": 10 + i,
                }
                for i in range(1, 26)
            ],
        )
        before = rows(conn)

    init_db(engine, 100)  # what `chat-bridge serve` does at start: migrate to the newest schema
    with engine.connect() as conn:
        assert rows(conn) == before
        assert "outbox" in inspect(conn).get_table_names()
        version = conn.exec_driver_sql("select version_num from alembic_version").scalar()
    assert version == "0002"

    w = World(SqlUnitOfWork(engine))
    sent = w.do("bob", "send-message", conversation_id="c_dm", body="after the upgrade")
    assert sent.answer["type"] == "message-added", sent.answer
    assert sent.data["message"]["seq"] == 26
    replay = w.do("alice", "send-message", conversation_id="c_dm", body="message 1 ✓", client_msg_id="c1")
    assert replay.data["message"]["message_id"] == "old-1"
    thread = w.do("bob", "reply", message_id="old-1", body="in the old thread")
    assert thread.data["message"]["conversation_id"] == "t_1"
    engine.dispose()


def test_a_database_from_before_migrations_is_adopted(tmp_path: Any) -> None:
    """Databases from builds before migrations (create_all, no alembic_version) are stamped, then upgraded."""
    engine = make_engine(f"sqlite:///{tmp_path}/old.sqlite3")
    with engine.begin() as conn:
        for table in FIRST_RELEASE_TABLES:
            table.create(conn)
        conn.execute(insert(users).values(user_id="alice", created_ms=1))
    init_db(engine, 0)
    with engine.connect() as conn:
        assert conn.execute(select(users.c.user_id)).scalars().all() == ["alice"]
        assert "outbox" in inspect(conn).get_table_names()
    engine.dispose()
