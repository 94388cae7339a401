"""The SQL store behaves exactly like its in-memory twin, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading

from world import World

from bridge.sql import SqlUnitOfWork, init_db, make_engine

USERS = ["alice", "bob", "carol", "dave"]


def history(w: World, seed: int = 7) -> list[tuple[str, str, str]]:
    """A long, mixed history of valid and invalid commands; returns everything delivered."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []

    def run(user: str, command: str, **fields: object) -> dict[str, object]:
        result = w.do(user, command, **fields)
        out.extend((d.kind, d.key, d.payload.model_dump_json()) for d in result.deliveries)
        answers = [d.payload for d in result.deliveries if d.kind == "inbox" and d.payload.request_id]
        return answers[0].model_dump(mode="json") if answers else {}

    for u in USERS:
        run(u, "connect", session_id=f"{u}-s", display_name=u.title())
    dm = run("alice", "create-conversation", kind="direct", participants=["bob"])["data"]["conversation"]
    run("bob", "create-conversation", kind="direct", participants=["alice"])
    grp = run("alice", "create-conversation", kind="group", participants=["bob", "carol"], title="g")["data"][
        "conversation"
    ]
    convs = [dm["conversation_id"], grp["conversation_id"], "global"]
    roots: list[str] = []
    for i in range(120):
        user = rng.choice(USERS)
        action = rng.random()
        if action < 0.45:
            ans = run(
                user,
                "send-message",
                conversation_id=rng.choice(convs),
                body=f"b{i}",
                client_msg_id=f"c{rng.randrange(30)}",
            )
            if ans.get("type") == "message-added":
                roots.append(ans["data"]["message"]["message_id"])  # type: ignore[index]
        elif action < 0.6 and roots:
            run(user, "reply", message_id=rng.choice(roots), body=f"r{i}")
        elif action < 0.7:
            run(
                user,
                "get-messages",
                conversation_id=rng.choice(convs),
                since_seq=rng.randrange(5),
                limit=rng.randrange(1, 6),
            )
        elif action < 0.8:
            run(user, "get-prior-messages", conversation_id=rng.choice(convs), limit=rng.randrange(1, 6))
        elif action < 0.85:
            run(user, "invite", conversation_id=grp["conversation_id"], user_ids=[rng.choice(USERS)])
        elif action < 0.9:
            run(user, "get-participants", conversation_id=rng.choice(convs))
        elif action < 0.95:
            run(user, rng.choice(["disconnect", "connect"]), session_id=f"{user}-s")
        else:
            run(user, "send-message", conversation_id=rng.choice(convs), body="")  # bad-request
        # (1.1) marks, edits, deletions, reactions, search and the rev cursor, beside every step
        kind = rng.random()
        target = rng.choice(roots) if roots else "m_none"
        if kind < 0.15:
            run(user, "mark-read", conversation_id=rng.choice(convs), seq=rng.randrange(0, 40))
        elif kind < 0.25:
            run(user, "edit-message", message_id=target, body=f"edited b{i} Word{rng.randrange(3)}")
        elif kind < 0.3:
            run(user, "delete-message", message_id=target)
        elif kind < 0.45:
            run(user, "react", message_id=target, emoji=rng.choice(["👍", "🎉", "x"]), on=rng.random() < 0.7)
        elif kind < 0.55:
            run(user, "search-messages", query=rng.choice(["word1", "B3 edited", "b1", "WORD0"]), limit=3)
        elif kind < 0.65:
            run(user, "get-messages", conversation_id=rng.choice(convs), since_rev=rng.randrange(10), limit=4)
        elif kind < 0.7:
            run(user, "typing", conversation_id=rng.choice(convs), typing=True)
    run("carol", "leave", conversation_id=grp["conversation_id"])
    run("alice", "get-conversations")
    run("alice", "remove-conversation", conversation_id=grp["conversation_id"])
    run("bob", "get-conversations")
    run("bob", "get-active-users")
    first = run("bob", "get-conversations", limit=1)["data"]
    run("bob", "get-conversations", after=first["next"], limit=2)  # type: ignore[index]
    page = run("bob", "get-participants", conversation_id="global", limit=2)["data"]
    run("bob", "get-participants", conversation_id="global", after=page["next"])  # type: ignore[index]
    run("bob", "get-active-users", limit=1, after="alice")
    return out


def test_membership_counts_agree(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    counts = []
    for w in (World(), World(SqlUnitOfWork(engine))):
        for u in USERS:
            w.do(u, "connect", session_id="s")
        w.do("alice", "create-conversation", kind="direct", participants=["bob"])
        w.do("alice", "create-conversation", kind="group", participants=["bob", "carol"])
        with w.uow.transaction() as store:
            counts.append(store.membership_counts(["alice", "bob", "carol", "dave", "nobody"]))
            assert store.membership_counts([]) == {}
    assert counts[0] == counts[1] == {"alice": 2, "bob": 2, "carol": 1}
    engine.dispose()


def test_participants_online_agree(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    found = []
    for w in (World(), World(SqlUnitOfWork(engine))):
        for u in USERS:
            w.do(u, "connect", session_id="s")
        w.do("carol", "connect", session_id="t")  # two sessions: one row all the same
        group = w.do("alice", "create-conversation", kind="group", participants=["dave", "bob", "carol"])
        cid = group.inbox("alice")[0]["data"]["conversation"]["conversation_id"]
        w.do("bob", "disconnect", session_id="s")
        w.do("carol", "disconnect", session_id="s")  # still online through "t"
        with w.uow.transaction() as store:
            found.append((store.participants_online(cid), store.participants_online("nothing")))
    assert found[0] == found[1]
    assert found[0] == (
        [("alice", True), ("bob", False), ("carol", True), ("dave", True)],
        [],
    )
    engine.dispose()


def test_sql_store_matches_the_memory_store(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    expected = history(World())
    got = history(World(SqlUnitOfWork(engine)))
    assert len(expected) > 300
    assert got == expected
    engine.dispose()


def test_concurrent_direct_creation_yields_one_conversation(database_url: str) -> None:
    """Two bridges (two engines) racing to create the same direct conversation: the database decides."""
    engines = [make_engine(database_url) for _ in range(2)]
    init_db(engines[0], 0)
    worlds = [World(SqlUnitOfWork(e)) for e in engines]
    worlds[0].do("alice", "connect", session_id="a")
    worlds[0].do("bob", "connect", session_id="b")
    barrier = threading.Barrier(2)
    results: list[str] = []

    def create(w: World, me: str, other: str) -> None:
        barrier.wait()
        out = w.do(me, "create-conversation", kind="direct", participants=[other])
        results.append(out.data["conversation"]["conversation_id"])

    threads = [
        threading.Thread(target=create, args=(worlds[0], "alice", "bob")),
        threading.Thread(target=create, args=(worlds[1], "bob", "alice")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1]
    for e in engines:
        e.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: object) -> None:
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path}/wal.sqlite3")
    init_db(engine, 0)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_nul_characters_and_case_twins_are_refused_cleanly_on_every_store(database_url: str) -> None:
    """PostgreSQL cannot store NUL in text: that must be bad-request, not `internal` with a traceback;
    and `ALICE` beside `alice` is refused by the SQL store's case-insensitive lookup too."""
    engine = make_engine(database_url)
    init_db(engine, 0)
    w = World(SqlUnitOfWork(engine))
    w.do("alice", "connect", session_id="a")
    for command, fields in (
        ("send-message", {"conversation_id": "global", "body": "nul \x00 inside"}),
        ("send-message", {"conversation_id": "global", "body": "x", "client_msg_id": "c\x00"}),
        ("connect", {"session_id": "s\x00"}),
        ("connect", {"session_id": "s", "display_name": "a\x00b"}),
        ("create-conversation", {"kind": "group", "participants": ["alice"], "title": "t\x00"}),
    ):
        assert w.do("bob", command, **fields).error == "bad-request", (command, fields)
    assert w.do("ALICE", "connect", session_id="x").error == "forbidden"
    assert w.do("Alice", "send-message", conversation_id="global", body="hi").error == "forbidden"
    history = w.do("alice", "get-messages", conversation_id="global", since_seq=0).data["messages"]
    assert history == []
    assert (
        w.do("alice", "send-message", conversation_id="global", body="ok").answer["type"] == "message-added"
    )
    engine.dispose()
