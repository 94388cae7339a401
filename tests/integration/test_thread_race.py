"""Exactly one thread per root message, even when two bridge processes reply at the same moment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select
from world import World

from bridge.sql import SqlUnitOfWork, conversations, init_db, make_engine, messages

WORKER = Path(__file__).resolve().parent.parent / "race_worker.py"
ROUNDS = 30


def test_two_processes_replying_at_once_make_one_thread(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    w = World(SqlUnitOfWork(engine))
    w.do("alice", "connect", session_id="a")
    w.do("bob", "connect", session_id="b")
    cid = w.do("alice", "create-conversation", kind="group", participants=["bob"]).data["conversation"][
        "conversation_id"
    ]
    roots = [
        w.do("alice", "send-message", conversation_id=cid, body=f"root {i}").data["message"]["message_id"]
        for i in range(ROUNDS)
    ]

    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), database_url, user],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for user in ("alice", "bob")
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        conflicts = 0
        for root in roots:
            for p in procs:  # both get the line within microseconds of each other
                assert p.stdin is not None
                p.stdin.write(f"reply {root}\n")
                p.stdin.flush()
            answers = [p.stdout.readline().split() for p in procs if p.stdout is not None]
            assert answers[0][0] == answers[1][0], f"two threads for {root}: {answers}"
            conflicts = sum(int(a[1]) for a in answers)
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.wait(30)

    with engine.connect() as conn:
        threads = conn.execute(
            select(conversations.c.parent_message_id, func.count())
            .where(conversations.c.kind == "thread")
            .group_by(conversations.c.parent_message_id)
        ).all()
        assert sorted(r[0] for r in threads) == sorted(roots) and all(r[1] == 1 for r in threads)
        per_thread = conn.execute(
            select(messages.c.conversation_id, func.count(), func.max(messages.c.seq))
            .where(messages.c.conversation_id != cid)
            .group_by(messages.c.conversation_id)
        ).all()
        assert len(per_thread) == ROUNDS and all(r[1] == 2 and r[2] == 2 for r in per_thread)
    print(f"{database_url.split(':')[0]}: {ROUNDS} races, {conflicts} resolved by the unique constraint")
    engine.dispose()
