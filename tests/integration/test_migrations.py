"""Schema migrations: they build exactly the models' schema, and upgrades keep every row."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, column, insert, inspect, select, table
from sqlmodel import SQLModel
from world import World

from bridge.sql import (
    SEARCH_OBJECTS,
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

    def ours(obj: Any, name: str | None, kind: str, reflected: bool, _compare_to: Any) -> bool:
        """The search structures are one dialect's each, outside the models (checked below)."""
        return not (name or "").startswith(SEARCH_OBJECTS)

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": ours})
        diffs = compare_metadata(context, SQLModel.metadata)
        tables = inspect(conn).get_table_names()
        indexes = {i["name"] for i in inspect(conn).get_indexes("messages")}
    engine.dispose()
    assert diffs == [], diffs
    if engine.dialect.name == "sqlite":
        assert "message_search" in tables
    else:
        assert "ix_messages_search" in indexes


def rows(conn: Any, columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the first release's tables, in the first release's columns."""
    return {
        name: sorted(tuple(r) for r in conn.execute(select(table(name, *map(column, cols)))).all())
        for name, cols in columns.items()
    }


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
        first = MetaData()
        columns = {
            t.name: [c.name for c in Table(t.name, first, autoload_with=conn).columns]
            for t in FIRST_RELEASE_TABLES
        }
        before = rows(conn, columns)

    init_db(engine, 100)  # what `chat-bridge serve` does at start: migrate to the newest schema
    with engine.connect() as conn:
        assert rows(conn, columns) == before
        assert "outbox" in inspect(conn).get_table_names()
        version = conn.exec_driver_sql("select version_num from alembic_version").scalar()
        revs = dict(conn.execute(select(messages.c.message_id, messages.c.rev)).all())
        last = dict(conn.execute(select(conversations.c.conversation_id, conversations.c.last_rev)).all())
    assert version == "0004"
    assert revs == {f"old-{i}": i for i in range(1, 26)}, "existing messages get rev = seq"
    assert last == {"global": 0, "c_dm": 25, "c_g": 0, "t_1": 0}

    w = World(SqlUnitOfWork(engine))
    sent = w.do("bob", "send-message", conversation_id="c_dm", body="after the upgrade")
    assert sent.answer["type"] == "message-added", sent.answer
    assert sent.data["message"]["seq"] == 26
    replay = w.do("alice", "send-message", conversation_id="c_dm", body="message 1 ✓", client_msg_id="c1")
    assert replay.data["message"]["message_id"] == "old-1"
    thread = w.do("bob", "reply", message_id="old-1", body="in the old thread")
    assert thread.data["message"]["conversation_id"] == "t_1"
    assert sent.data["message"]["rev"] == 26
    found = w.do("alice", "search-messages", query="MESSAGE 7")
    assert [m["message_id"] for m in found.data["messages"]] == ["old-7"], "old messages are indexed"
    w.do("alice", "edit-message", message_id="old-7", body="rewritten")
    assert w.do("alice", "search-messages", query="message 7").data["messages"] == []
    caught_up = w.do("alice", "get-messages", conversation_id="c_dm", since_rev=25)
    assert [(m["message_id"], m["rev"]) for m in caught_up.data["messages"]] == [
        (sent.data["message"]["message_id"], 26),
        ("old-7", 27),
    ]
    unread = w.do("alice", "get-conversations").data["conversations"]
    assert {c["conversation_id"]: c["unread"] for c in unread}["c_dm"] == 26, "no marker was invented"
    engine.dispose()


def test_a_database_from_before_migrations_is_adopted(tmp_path: Any) -> None:
    """Databases from builds before migrations (create_all, no alembic_version) are stamped, then upgraded."""
    engine = make_engine(f"sqlite:///{tmp_path}/old.sqlite3")
    migrate(engine, "0001")  # the first release's tables, as create_all made them then
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.execute(insert(users).values(user_id="alice", created_ms=1))
    init_db(engine, 0)
    with engine.connect() as conn:
        assert conn.execute(select(users.c.user_id)).scalars().all() == ["alice"]
        assert "outbox" in inspect(conn).get_table_names()
    engine.dispose()
