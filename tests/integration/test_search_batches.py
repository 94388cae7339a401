"""Search in batches: commands that store, edit and search messages in one transaction, some of them
undone by their savepoint, index and find exactly what the in-memory store does (SQLite writes its
search rows at the end of the transaction, or before any statement on them)."""

from __future__ import annotations

import orjson
from world import World

from bridge.service import Inbound
from bridge.sql import SqlUnitOfWork, init_db, make_engine


def batch(w: World, *commands: tuple[str, str, dict[str, object]]) -> list[tuple[str, str, str]]:
    items = [
        Inbound(user, name, orjson.dumps({"request_id": "r", **fields})) for user, name, fields in commands
    ]
    deliveries = w.service.handle_batch(items).deliveries
    return [(d.kind, d.key, d.payload.model_dump_json()) for d in deliveries]


def found(w: World, user: str, query: str) -> list[str]:
    (delivery,) = w.service.handle(Inbound(user, "search-messages", orjson.dumps({"query": query})))
    return [m.body for m in delivery.payload.data.messages]  # type: ignore[attr-defined]


def story(w: World) -> list[tuple[str, str, str]]:
    w.service.max_event = 4096  # an edit to a long body makes an event too large: undone by its savepoint
    out = batch(
        w,
        ("alice", "connect", {"session_id": "a"}),
        ("bob", "connect", {"session_id": "b"}),
        ("alice", "create-conversation", {"kind": "direct", "participants": ["bob"]}),
    )
    dm = next(
        orjson.loads(p)["data"]["conversation"]["conversation_id"]
        for k, u, p in out
        if u == "alice" and "conversation-created" in p
    )

    def send(body: str, cmid: str) -> tuple[str, str, dict[str, object]]:
        return ("alice", "send-message", {"conversation_id": dm, "body": body, "client_msg_id": cmid})

    out += batch(
        w, send("apple one", "1"), send("banana two", "2"), ("bob", "search-messages", {"query": "apple"})
    )
    first = [
        orjson.loads(p)["data"]["message"]["message_id"]
        for k, u, p in out
        if u == "alice" and "message-added" in p
    ]
    out += batch(
        w,
        send("cherry three", "3"),
        # flushes the cherry row inside its savepoint, then fails (too large): the row must survive
        ("alice", "edit-message", {"message_id": first[0], "body": "apple " * 1000}),
        send("", "4"),  # bad-request
        send("damson four", "5"),
        ("alice", "edit-message", {"message_id": first[1], "body": "banana elder"}),  # damson waits
        ("bob", "search-messages", {"query": "elder"}),
        send("fig five", "6"),
        ("alice", "delete-message", {"message_id": first[0]}),
        ("bob", "search-messages", {"query": "apple"}),
    )
    out += batch(
        w,
        send("grape " * 1000, "7"),  # stored, then too large an event: undone with its search row
        send("honeydew six", "8"),  # the batch's last: its row is written at the commit
    )
    for query in ("apple", "banana", "cherry", "damson", "elder", "fig", "grape", "honeydew", "two"):
        out.append(("search", query, orjson.dumps(found(w, "bob", query)).decode()))
    return out


def test_search_in_batches_matches_the_memory_store(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    expected = story(World())
    got = story(World(SqlUnitOfWork(engine)))
    assert ("search", "cherry", '["cherry three"]') in expected
    assert ("search", "elder", '["banana elder"]') in expected and ("search", "apple", "[]") in expected
    assert any("payload-too-large" in payload for _, _, payload in expected)
    assert ("search", "honeydew", '["honeydew six"]') in expected and ("search", "grape", "[]") in expected
    assert got == expected
    if engine.dialect.name == "sqlite":  # one search row for each message that has words, no other
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT rowid FROM message_search ORDER BY rowid").fetchall()
            linked = conn.exec_driver_sql(
                "SELECT search_rowid FROM messages WHERE search_rowid IS NOT NULL ORDER BY search_rowid"
            ).fetchall()
        assert rows == linked and len(rows) == 5  # banana, cherry, damson, fig, honeydew
    engine.dispose()
