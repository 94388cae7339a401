"""Every event the bridge publishes fits the broker: lists are cut into pages by bytes, an event that
still cannot fit is refused with an error, and nobody can bury another user in conversations."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from world import World

from bridge.limits import DEFAULT_MAX_EVENT, MAX_CONVERSATIONS_PER_USER, MAX_GROUP_PARTICIPANTS
from bridge.memory import MemoryStore
from bridge.model import ChatSession, Conversation, User
from bridge.service import Inbound

BROKER_MAX_PACKET = 128 * 1024  # the shipped Mosquitto config's max_packet_size


def sizes(w: World, user: str, command: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
    """The answer to a command, and the size of every event it produced as the outbox holds it."""
    fields.setdefault("request_id", "r")
    batch = w.service.handle_batch([Inbound(user, command, orjson.dumps(fields))])
    answers = [
        d.payload.model_dump(mode="json")
        for d in batch.deliveries
        if d.kind == "inbox" and getattr(d.payload, "request_id", None)
    ]
    assert len(answers) == 1, answers
    return answers[0], [len(e.payload) for e in batch.entries]


def store_of(w: World) -> MemoryStore:
    store = w.uow.store  # type: ignore[attr-defined]
    assert isinstance(store, MemoryStore)
    return store


def test_a_page_of_large_messages_is_cut_by_bytes_and_pages_through_all() -> None:
    """17 messages of 8,000 characters: one `messages` event of limit 100 was ~160 KB, over the broker's
    128 KiB, which wedged the bridge."""
    w = World()
    for i in range(17):
        w.do("alice", "send-message", conversation_id="global", body=f"{i:02d}" + "x" * 7998)
    answer, out = sizes(w, "bob", "get-messages", conversation_id="global", since_seq=0, limit=100)
    assert max(out) <= DEFAULT_MAX_EVENT < BROKER_MAX_PACKET
    page = answer["data"]
    assert 0 < len(page["messages"]) < 17 and page["has_more"] is True
    seen = [m["seq"] for m in page["messages"]]
    while page["has_more"]:
        answer, out = sizes(w, "bob", "get-messages", conversation_id="global", since_seq=seen[-1], limit=100)
        assert max(out) <= DEFAULT_MAX_EVENT
        page = answer["data"]
        seen += [m["seq"] for m in page["messages"]]
    assert seen == list(range(1, 18))
    # backwards: the newest that fit, in ascending order, has_more towards the oldest
    answer, out = sizes(w, "bob", "get-prior-messages", conversation_id="global", limit=100)
    assert max(out) <= DEFAULT_MAX_EVENT
    prior = [m["seq"] for m in answer["data"]["messages"]]
    assert prior == list(range(18 - len(prior), 18)) and len(prior) < 17 and answer["data"]["has_more"]


def test_small_messages_still_fill_a_page() -> None:
    w = World()
    for i in range(120):
        w.do("alice", "send-message", conversation_id="global", body=f"m{i}")
    page = w.do("bob", "get-messages", conversation_id="global", since_seq=0, limit=100).data
    assert len(page["messages"]) == 100 and page["has_more"] is True


def add_groups(w: World, member: str, count: int) -> None:
    """`count` groups that `member` was put in by mallory, written straight into the store."""
    store = store_of(w)
    for u in ("mallory", member):
        store.save_user(User(u, None, 0))
    for i in range(count):
        conv = Conversation(f"g{i:04d}", "group", f"group number {i}", "mallory", None, None, 1_000 + i)
        store.add_conversation(conv, ["mallory", member])


def test_connected_of_a_user_in_560_groups_fits_and_the_rest_pages_through_get_conversations() -> None:
    """A victim added to 560 groups: their `connected` answer was over the broker's limit."""
    w = World()
    add_groups(w, "bob", 560)
    answer, out = sizes(w, "bob", "connect", session_id="b1")
    assert max(out) <= DEFAULT_MAX_EVENT
    data = answer["data"]
    assert data["conversations"][0]["conversation_id"] == "global"
    assert data["conversations_next"] is not None and len(data["conversations"]) < 561
    ids = [c["conversation_id"] for c in data["conversations"]]
    after = data["conversations_next"]
    while after is not None:
        answer, out = sizes(w, "bob", "get-conversations", after=after)
        assert max(out) <= DEFAULT_MAX_EVENT
        ids += [c["conversation_id"] for c in answer["data"]["conversations"]]
        after = answer["data"]["next"]
        assert answer["data"]["has_more"] is (after is not None)
    assert ids == ["global"] + [f"g{i:04d}" for i in range(560)]
    # get-conversations alone pages the same way, `limit` included
    first = w.do("bob", "get-conversations", limit=2).data
    assert [c["conversation_id"] for c in first["conversations"]] == ["global", "g0000"]
    second = w.do("bob", "get-conversations", limit=2, after=first["next"]).data
    assert [c["conversation_id"] for c in second["conversations"]] == ["g0001", "g0002"]


def test_a_page_cursor_survives_a_removed_conversation() -> None:
    w = World()
    add_groups(w, "bob", 5)
    first = w.do("bob", "get-conversations", limit=3).data
    assert first["next"] is not None
    w.do("mallory", "remove-conversation", conversation_id="g0001")  # the last one of bob's page
    rest = w.do("bob", "get-conversations", after=first["next"]).data
    assert [c["conversation_id"] for c in rest["conversations"]] == ["g0002", "g0003", "g0004"]
    assert rest["next"] is None and rest["has_more"] is False


def test_a_short_list_is_one_page() -> None:
    w = World()
    w.do("alice", "connect", session_id="a1")
    data = w.do("alice", "get-conversations").data
    assert data["has_more"] is False and data["next"] is None
    connected = w.do("alice", "connect", session_id="a2").data
    assert connected["conversations_next"] is None and connected["active_users_next"] is None


@pytest.mark.parametrize("after", ["nonsense", "12", "1.a/b", "x" * 101])
def test_a_bad_cursor_is_bad_request(after: str) -> None:
    w = World()
    assert w.do("alice", "get-conversations", after=after).error == "bad-request"


def add_users(w: World, count: int, active: bool) -> list[str]:
    store = store_of(w)
    ids = [f"user-{i:05d}" for i in range(count)]
    for u in ids:
        store.save_user(User(u, f"User number {u[5:]}", 0))
        if active:
            store.save_session(ChatSession(u, "s", "e1", 0))
    return ids


def page_through(w: World, command: str, key: str, **fields: Any) -> list[str]:
    got: list[str] = []
    after = None
    while True:
        if after is not None:
            fields["after"] = after
        answer, out = sizes(w, "user-00000", command, **fields)
        assert max(out) <= DEFAULT_MAX_EVENT
        got += [u["user_id"] for u in answer["data"][key]]
        after = answer["data"]["next"]
        assert answer["data"]["has_more"] is (after is not None)
        if after is None:
            return got


def test_participants_of_global_with_2600_users_fit_and_page_through() -> None:
    """`get-participants global` lists every known user: with ~2,600 it was over the broker's limit."""
    w = World()
    ids = add_users(w, 2600, active=False)
    answer, out = sizes(w, "user-00000", "get-participants", conversation_id="global")
    assert max(out) <= DEFAULT_MAX_EVENT
    assert answer["data"]["has_more"] is True
    assert page_through(w, "get-participants", "participants", conversation_id="global") == ids
    small = w.do("user-00000", "get-participants", conversation_id="global", limit=3).data
    assert [u["user_id"] for u in small["participants"]] == ids[:3] and small["next"] == ids[2]


def test_active_users_and_connected_with_2600_online_fit_and_page_through() -> None:
    w = World()
    ids = add_users(w, 2600, active=True)
    answer, out = sizes(w, "user-00000", "get-active-users")
    assert max(out) <= DEFAULT_MAX_EVENT and answer["data"]["has_more"] is True
    assert page_through(w, "get-active-users", "users") == ids
    answer, out = sizes(w, "newcomer", "connect", session_id="n1")
    assert max(out) <= DEFAULT_MAX_EVENT
    data = answer["data"]
    got = [u["user_id"] for u in data["active_users"]]
    after = data["active_users_next"]
    assert after is not None
    while after is not None:
        page = w.do("newcomer", "get-active-users", after=after).data
        got += [u["user_id"] for u in page["users"]]
        after = page["next"]
    assert got == sorted([*ids, "newcomer"])


def test_an_event_that_cannot_fit_is_an_error_answer_and_changes_nothing() -> None:
    """An event over the limit is never stored in the outbox: the command is undone and answered
    `payload-too-large`."""
    from bridge.service import Service

    w = World()
    w.do("alice", "connect", session_id="a1")
    w.service = Service(w.uow, epoch="e1", clock=w.clock, ids=w.service.ids, max_event=4096)
    before = w.state()
    answer, out = sizes(w, "alice", "send-message", conversation_id="global", body="é" * 3000)
    assert answer["type"] == "error" and answer["data"]["code"] == "payload-too-large"
    assert answer["request_id"] == "r" and "4096" in answer["data"]["message"]
    assert max(out) <= 4096 and len(out) == 1  # the error only
    assert w.state() == before
    assert all(len(e.payload) <= 4096 for e in store_of(w).pending_outbox())
    ok, _ = sizes(w, "alice", "send-message", conversation_id="global", body="short")
    assert ok["type"] == "message-added"


def test_others_cannot_put_a_user_in_more_conversations_than_the_cap() -> None:
    w = World()
    add_groups(w, "bob", MAX_CONVERSATIONS_PER_USER)
    w.do("alice", "connect", session_id="a1")
    w.do("carol", "connect", session_id="c1")
    group = w.do("alice", "create-conversation", kind="group", participants=["carol"]).data
    cid = group["conversation"]["conversation_id"]
    before = w.state()
    for refused in (
        w.do("alice", "create-conversation", kind="group", participants=["bob", "carol"]),
        w.do("alice", "create-conversation", kind="direct", participants=["bob"]),
        w.do("alice", "invite", conversation_id=cid, user_ids=["bob"]),
    ):
        assert refused.error == "forbidden"
        assert "bob" in refused.answer["data"]["message"]
    assert w.state() == before
    # bob himself may still start conversations, and others can still reach him where he is
    mine = w.do("bob", "create-conversation", kind="group", participants=["alice"])
    assert mine.answer["type"] == "conversation-created"


def test_a_group_has_at_most_the_cap_of_participants() -> None:
    w = World()
    ids = add_users(w, MAX_GROUP_PARTICIPANTS + 1, active=False)
    owner = ids[0]
    cid = w.do(owner, "create-conversation", kind="group", participants=ids[1:100]).data["conversation"][
        "conversation_id"
    ]
    for start in range(100, MAX_GROUP_PARTICIPANTS, 100):
        assert w.do(owner, "invite", conversation_id=cid, user_ids=ids[start : start + 100]).answer[
            "type"
        ] == ("participants-added")
    out = w.do(owner, "invite", conversation_id=cid, user_ids=ids[MAX_GROUP_PARTICIPANTS:])
    assert out.error == "forbidden"
    # the largest group's conversation object still fits in one event
    answer, sizes_ = sizes(w, owner, "get-conversations")
    assert max(sizes_) <= DEFAULT_MAX_EVENT and len(answer["data"]["conversations"]) == 2


def test_search_results_of_large_messages_are_cut_by_bytes() -> None:
    w = World()
    for i in range(20):
        w.do("alice", "send-message", conversation_id="global", body=f"needle {i:02d} " + "x" * 7980)
    answer, out = sizes(w, "bob", "search-messages", query="needle", limit=100)
    assert answer["type"] == "search-results" and max(out) <= DEFAULT_MAX_EVENT
    assert 0 < len(answer["data"]["messages"]) < 20 and answer["data"]["has_more"] is True
