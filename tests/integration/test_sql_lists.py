"""The store's statements over a list of ids (compiled once per padded length, long lists in chunks)
answer like the in-memory store, whatever the list's length, order and repeats."""

from __future__ import annotations

import pytest

from bridge.memory import MemoryUnitOfWork
from bridge.model import ChatSession, Conversation, Store, UnitOfWork, User
from bridge.sql import IN_CHUNK, SqlUnitOfWork, init_db, make_engine

COUNT = 2 * IN_CHUNK + 77  # three chunks, the last of a length that is no power of two
IDS = [f"u{i:04d}" for i in range(COUNT)]


def populate(store: Store) -> None:
    for i, u in enumerate(IDS):
        store.save_user(User(u, f"User {i}", i))
        if i % 3 == 0:
            store.save_session(ChatSession(u, "s", "e", 0))
        if i % 3 == 1:
            store.save_session(ChatSession(u, "s", "e", 0, ended_ms=1))  # ended: not active
    for g in range(4):
        members = IDS[g :: 4 + g]
        store.add_conversation(Conversation(f"g{g}", "group", None, None, None, None, g), members)
        for u in members[::2]:
            store.set_read_seq(f"g{g}", u, 1)


def answers(uow: UnitOfWork, wanted: list[str]) -> tuple[object, ...]:
    with uow.transaction() as store:
        populate(store)
    with uow.transaction() as store:
        found = (
            [u.user_id for u in store.get_users(wanted)],
            store.without_active_session(wanted),
            store.membership_counts(wanted),
        )
        store.forget_read_markers([f"g{g}" for g in range(4)] + ["nothing"], wanted[0])
        store.forget_read_markers(["g1", "g2", "g1"], wanted[-1])
        markers = {u: store.read_markers(u) for u in {wanted[0], wanted[-1], IDS[4]}}
    return (*found, markers)


@pytest.mark.parametrize(
    "wanted",
    [
        ["u0000"],
        ["u0001", "nobody", "u0003"],
        [*reversed(IDS), "nobody", "u0005", "u0005"],  # over two chunks, with repeats
        IDS[: IN_CHUNK + 1] + IDS[:10],
    ],
    ids=["one", "three", "all-reversed", "a-chunk-and-one"],
)
def test_lists_of_every_length_agree_with_the_memory_store(database_url: str, wanted: list[str]) -> None:
    engine = make_engine(database_url)
    init_db(engine, 0)
    try:
        expected = answers(MemoryUnitOfWork(), wanted)
        assert answers(SqlUnitOfWork(engine), wanted) == expected
    finally:
        engine.dispose()
