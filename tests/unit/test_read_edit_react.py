"""Protocol 1.1 rules as command histories: read markers, typing, edits, deletions, reactions,
revisions, search and offline notifications."""

from __future__ import annotations

from typing import Any

import pytest
from world import World

from bridge.memory import MemoryUnitOfWork


def world() -> tuple[World, str]:
    w = World()
    for u in ("alice", "bob", "carol"):
        w.do(u, "connect", session_id=f"{u}-s")
    cid = w.do("alice", "create-conversation", kind="group", participants=["bob"], title="g").data[
        "conversation"
    ]["conversation_id"]
    return w, cid


def send(w: World, user: str, cid: str, body: str) -> dict[str, Any]:
    return w.do(user, "send-message", conversation_id=cid, body=body).data["message"]  # type: ignore[no-any-return]


def conv_of(w: World, user: str, cid: str) -> dict[str, Any]:
    convs = w.do(user, "get-conversations").data["conversations"]
    return next(c for c in convs if c["conversation_id"] == cid)  # type: ignore[no-any-return]


# --- read markers ---------------------------------------------------------------------


def test_mark_read_moves_forward_and_tells_the_others_not_the_topic() -> None:
    w, cid = world()
    for i in range(3):
        send(w, "alice", cid, f"m{i}")
    assert (conv_of(w, "bob", cid)["read_seq"], conv_of(w, "bob", cid)["unread"]) == (0, 3)
    out = w.do("bob", "mark-read", conversation_id=cid, seq=2)
    assert out.answer["type"] == "read-marker"
    assert out.data == {"conversation_id": cid, "user_id": "bob", "read_seq": 2}
    assert out.recipients("read-marker") == ["alice", "bob"]
    assert out.conversation_topic(cid) == []
    assert (conv_of(w, "bob", cid)["read_seq"], conv_of(w, "bob", cid)["unread"]) == (2, 1)


def test_mark_read_backwards_or_equal_changes_nothing_and_tells_nobody() -> None:
    w, cid = world()
    for i in range(3):
        send(w, "alice", cid, f"m{i}")
    w.do("bob", "mark-read", conversation_id=cid, seq=2)
    for seq in (2, 1, 0):
        out = w.do("bob", "mark-read", conversation_id=cid, seq=seq)
        assert out.data["read_seq"] == 2
        assert out.recipients("read-marker") == ["bob"]


def test_mark_read_beyond_last_seq_is_clamped() -> None:
    w, cid = world()
    send(w, "alice", cid, "one")
    out = w.do("bob", "mark-read", conversation_id=cid, seq=10**9)
    assert out.data["read_seq"] == 1
    assert conv_of(w, "bob", cid)["unread"] == 0
    send(w, "alice", cid, "two")
    assert conv_of(w, "bob", cid)["unread"] == 1, "a clamped marker does not swallow later messages"


def test_sending_moves_the_senders_marker_silently() -> None:
    w, cid = world()
    send(w, "alice", cid, "one")
    out = w.do("bob", "send-message", conversation_id=cid, body="two")
    assert out.recipients("read-marker") == []
    assert (conv_of(w, "bob", cid)["read_seq"], conv_of(w, "bob", cid)["unread"]) == (2, 0)
    assert conv_of(w, "alice", cid)["unread"] == 1


def test_markers_are_per_user_and_connected_carries_them() -> None:
    w, cid = world()
    send(w, "alice", cid, "one")
    w.do("bob", "mark-read", conversation_id=cid, seq=1)
    convs = w.do("bob", "connect", session_id="bob-phone").data["conversations"]
    mine = next(c for c in convs if c["conversation_id"] == cid)
    assert (mine["read_seq"], mine["unread"], mine["last_seq"]) == (1, 0, 1)
    assert conv_of(w, "alice", cid)["read_seq"] == 1  # her own message


def test_mark_read_in_global_tells_nobody_else_and_unknown_is_not_found() -> None:
    w, cid = world()
    send(w, "alice", "global", "hi all")
    out = w.do("bob", "mark-read", conversation_id="global", seq=1)
    assert out.data["read_seq"] == 1 and out.recipients("read-marker") == ["bob"]
    assert w.do("carol", "mark-read", conversation_id=cid, seq=1).error == "not-found"
    assert w.do("bob", "mark-read", conversation_id=cid, seq=-1).error == "bad-request"


def test_unread_on_the_conversation_topic_is_zero() -> None:
    w, cid = world()
    send(w, "alice", cid, "one")
    out = w.do("alice", "reply", message_id=send(w, "alice", cid, "root")["message_id"], body="r")
    topic = [d.payload.model_dump(mode="json") for d in out.deliveries if d.kind == "conversation"]
    created = next(e for e in topic if e["type"] == "conversation-created")
    assert (created["data"]["conversation"]["read_seq"], created["data"]["conversation"]["unread"]) == (0, 0)


def test_leaving_forgets_the_marker_so_a_reinvite_counts_everything_unread() -> None:
    w, cid = world()
    w.do("alice", "invite", conversation_id=cid, user_ids=["carol"])
    send(w, "alice", cid, "one")
    w.do("carol", "mark-read", conversation_id=cid, seq=1)
    w.do("carol", "leave", conversation_id=cid)
    out = w.do("alice", "invite", conversation_id=cid, user_ids=["carol"])
    created = next(e for e in out.inbox("carol") if e["type"] == "conversation-created")
    assert (created["data"]["conversation"]["read_seq"], created["data"]["conversation"]["unread"]) == (0, 1)
    assert conv_of(w, "carol", cid)["unread"] == 1


# --- typing -----------------------------------------------------------------------------


def test_typing_reaches_the_others_at_qos_0_unanswered_unstored() -> None:
    w, cid = world()
    assert isinstance(w.uow, MemoryUnitOfWork)
    before, transactions = w.state(), w.uow.transactions
    outbox = w.uow.store.pending_outbox()
    out = w.do("bob", "typing", conversation_id=cid, typing=True)
    assert out.inbox("bob") == []
    assert [(d.kind, d.key, d.qos) for d in out.deliveries] == [("inbox", "alice", 0)]
    assert out.inbox("alice")[0]["data"] == {"conversation_id": cid, "user_id": "bob", "typing": True}
    assert w.state() == before and w.uow.transactions == transactions, "typing needs no transaction"
    assert w.uow.store.pending_outbox() == outbox, "typing is never in the outbox"


def test_typing_errors_are_answered() -> None:
    w, cid = world()
    assert w.do("bob", "typing", conversation_id="global", typing=True).error == "forbidden"
    assert w.do("carol", "typing", conversation_id=cid, typing=True).error == "not-found"
    assert w.do("bob", "typing", conversation_id=cid, typing="yes").error == "bad-request"


def test_typing_in_a_batch_with_other_commands_stays_out_of_the_outbox() -> None:
    from bridge.service import Inbound

    w, cid = world()
    batch = w.service.handle_batch(
        [
            Inbound("bob", "typing", b'{"conversation_id": "%s", "typing": true}' % cid.encode()),
            Inbound("bob", "send-message", b'{"conversation_id": "%s", "body": "hi"}' % cid.encode()),
        ]
    )
    assert [e.qos for e in batch.ephemeral] == [0]
    assert all(b'"typing"' not in e.payload for e in batch.entries)
    assert all(b'"typing"' not in e.payload for e in w.uow.store.pending_outbox())  # type: ignore[attr-defined]


# --- edits and deletions --------------------------------------------------------------------


def test_edit_by_the_sender_takes_a_new_rev_and_tells_everyone() -> None:
    w, cid = world()
    m = send(w, "bob", cid, "helo")
    out = w.do("bob", "edit-message", message_id=m["message_id"], body="hello")
    edited = out.data["message"]
    assert (edited["body"], edited["seq"], edited["rev"]) == ("hello", m["seq"], m["rev"] + 1)
    assert edited["edited_at"] is not None and edited["deleted_at"] is None
    assert out.recipients("message-edited") == ["alice", "bob"]
    assert out.conversation_topic(cid) == ["message-edited"]


def test_only_the_sender_edits_and_the_body_rules_hold() -> None:
    w, cid = world()
    m = send(w, "bob", cid, "mine")
    assert w.do("alice", "edit-message", message_id=m["message_id"], body="x").error == "forbidden"
    assert w.do("carol", "edit-message", message_id=m["message_id"], body="x").error == "not-found"
    assert w.do("bob", "edit-message", message_id=m["message_id"], body="").error == "bad-request"
    assert w.do("bob", "edit-message", message_id=m["message_id"], body="x" * 8001).error == "bad-request"
    assert w.do("bob", "edit-message", message_id="m_nope", body="x").error == "not-found"


def test_an_edit_to_the_same_body_changes_nothing() -> None:
    w, cid = world()
    m = send(w, "bob", cid, "same")
    before = w.state()
    out = w.do("bob", "edit-message", message_id=m["message_id"], body="same")
    assert out.data["message"] == m and out.recipients("message-edited") == ["bob"]
    assert w.state() == before


def test_delete_leaves_a_tombstone_that_nothing_else_can_touch() -> None:
    w, cid = world()
    m = send(w, "bob", cid, "oops")
    w.do("alice", "react", message_id=m["message_id"], emoji="👍")
    out = w.do("bob", "delete-message", message_id=m["message_id"])
    tomb = out.data["message"]
    assert (tomb["body"], tomb["reactions"], tomb["seq"]) == ("", {}, m["seq"])
    assert tomb["deleted_at"] is not None and tomb["rev"] == m["rev"] + 2
    assert out.recipients("message-deleted") == ["alice", "bob"]
    assert out.conversation_topic(cid) == ["message-deleted"]
    mid = m["message_id"]
    assert w.do("bob", "edit-message", message_id=mid, body="x").error == "not-found"
    assert w.do("bob", "delete-message", message_id=mid).error == "not-found"
    assert w.do("alice", "react", message_id=mid, emoji="👍").error == "not-found"
    assert w.do("alice", "reply", message_id=mid, body="x").error == "not-found"
    history = w.do("alice", "get-messages", conversation_id=cid, since_seq=0).data["messages"]
    assert [x["body"] for x in history] == [""], "the tombstone keeps its seq in history"


def test_the_group_owner_deletes_others_messages_in_the_group_and_its_threads() -> None:
    w, cid = world()
    w.do("alice", "invite", conversation_id=cid, user_ids=["carol"])
    m = send(w, "bob", cid, "from bob")
    r = w.do("carol", "reply", message_id=m["message_id"], body="in thread").data["message"]
    assert w.do("carol", "delete-message", message_id=m["message_id"]).error == "forbidden"
    assert w.do("bob", "delete-message", message_id=r["message_id"]).error == "forbidden"
    assert w.do("alice", "delete-message", message_id=r["message_id"]).answer["type"] == "message-deleted"
    assert w.do("alice", "delete-message", message_id=m["message_id"]).answer["type"] == "message-deleted"


def test_nobody_but_the_sender_deletes_in_direct_and_global() -> None:
    w, _ = world()
    dm = w.do("alice", "create-conversation", kind="direct", participants=["bob"]).data["conversation"]
    m = send(w, "bob", dm["conversation_id"], "dm")
    g = send(w, "bob", "global", "g")
    assert w.do("alice", "delete-message", message_id=m["message_id"]).error == "forbidden"
    assert w.do("alice", "delete-message", message_id=g["message_id"]).error == "forbidden"


# --- reactions ------------------------------------------------------------------------------


def test_reactions_in_order_idempotent_and_re_adding_goes_last() -> None:
    w, cid = world()
    mid = send(w, "bob", cid, "react to me")["message_id"]
    first = w.do("alice", "react", message_id=mid, emoji="👍")
    assert first.data["message"]["reactions"] == {"👍": ["alice"]}
    assert first.data["on"] is True and first.recipients("reaction-changed") == ["alice", "bob"]
    assert first.conversation_topic(cid) == ["reaction-changed"]
    w.do("bob", "react", message_id=mid, emoji="👍")
    w.do("bob", "react", message_id=mid, emoji="🎉")
    again = w.do("alice", "react", message_id=mid, emoji="👍")  # already there
    assert again.recipients("reaction-changed") == ["alice"]
    assert (
        again.data["message"]["rev"]
        == w.do("alice", "get-messages", conversation_id=cid, since_seq=0).data["messages"][0]["rev"]
    )
    absent = w.do("alice", "react", message_id=mid, emoji="🎉", on=False)
    assert absent.data["on"] is False and absent.recipients("reaction-changed") == ["alice"]
    w.do("alice", "react", message_id=mid, emoji="👍", on=False)
    last = w.do("alice", "react", message_id=mid, emoji="👍")
    assert last.data["message"]["reactions"] == {"👍": ["bob", "alice"], "🎉": ["bob"]}


def test_emoji_rules() -> None:
    w, cid = world()
    mid = send(w, "bob", cid, "x")["message_id"]
    assert w.do("alice", "react", message_id=mid, emoji="").error == "bad-request"
    assert w.do("alice", "react", message_id=mid, emoji="x" * 17).error == "bad-request"
    assert w.do("alice", "react", message_id=mid, emoji="a b").error == "bad-request"
    assert w.do("alice", "react", message_id=mid, emoji="\x00").error == "bad-request"
    family = "👨\u200d👩\u200d👧\u200d👦"  # 7 code points
    assert w.do("alice", "react", message_id=mid, emoji=family).answer["type"] == "reaction-changed"
    assert w.do("carol", "react", message_id=mid, emoji="👍").error == "not-found"


def test_a_message_takes_at_most_64_different_emoji() -> None:
    w, cid = world()
    mid = send(w, "bob", cid, "x")["message_id"]
    for i in range(64):
        assert w.do("alice", "react", message_id=mid, emoji=f"e{i}").answer["type"] == "reaction-changed"
    assert w.do("alice", "react", message_id=mid, emoji="one-more").error == "forbidden"
    assert w.do("bob", "react", message_id=mid, emoji="e1").answer["type"] == "reaction-changed"


# --- revisions ------------------------------------------------------------------------------


def test_since_rev_returns_new_and_changed_messages_in_rev_order() -> None:
    w, cid = world()
    a = send(w, "alice", cid, "a")
    b = send(w, "alice", cid, "b")
    seen = b["rev"]
    w.do("alice", "edit-message", message_id=a["message_id"], body="a2")
    c = send(w, "bob", cid, "c")
    w.do("bob", "react", message_id=b["message_id"], emoji="👍")
    out = w.do("alice", "get-messages", conversation_id=cid, since_rev=seen)
    got = [(m["message_id"], m["rev"]) for m in out.data["messages"]]
    assert got == [(a["message_id"], 3), (c["message_id"], 4), (b["message_id"], 5)]
    assert out.data["has_more"] is False
    page = w.do("alice", "get-messages", conversation_id=cid, since_rev=seen, limit=2).data
    assert len(page["messages"]) == 2 and page["has_more"] is True
    assert conv_of(w, "alice", cid)["last_rev"] == 5


def test_get_messages_takes_exactly_one_cursor() -> None:
    w, cid = world()
    assert w.do("bob", "get-messages", conversation_id=cid).error == "bad-request"
    assert w.do("bob", "get-messages", conversation_id=cid, since_seq=0, since_rev=0).error == "bad-request"


# --- search ---------------------------------------------------------------------------------


def test_search_whole_words_case_insensitive_newest_first_in_my_conversations() -> None:
    w, cid = world()
    old = send(w, "bob", cid, "The Quick brown fox")
    send(w, "bob", cid, "quickly now")
    new = send(w, "alice", "global", "quick FOX!")
    dm = w.do("carol", "create-conversation", kind="direct", participants=["alice"]).data["conversation"]
    send(w, "carol", dm["conversation_id"], "quick fox in private")
    out = w.do("bob", "search-messages", query="fox QUICK", request_id="q1")
    assert out.answer["request_id"] == "q1"
    assert out.data["query"] == "fox QUICK"
    assert [m["message_id"] for m in out.data["messages"]] == [new["message_id"], old["message_id"]]
    only = w.do("bob", "search-messages", query="fox", conversation_id=cid).data["messages"]
    assert [m["message_id"] for m in only] == [old["message_id"]]
    assert w.do("bob", "search-messages", query="fox", conversation_id=dm["conversation_id"]).error == (
        "not-found"
    )


def test_search_follows_edits_and_never_finds_tombstones() -> None:
    w, cid = world()
    m = send(w, "bob", cid, "banana split")
    gone = send(w, "bob", cid, "banana bread")
    w.do("bob", "edit-message", message_id=m["message_id"], body="apple pie")
    w.do("bob", "delete-message", message_id=gone["message_id"])
    assert w.do("alice", "search-messages", query="banana").data["messages"] == []
    assert [x["body"] for x in w.do("alice", "search-messages", query="pie").data["messages"]] == [
        "apple pie"
    ]


def test_search_pages_with_has_more_and_before_message_id() -> None:
    w, cid = world()
    sent = [send(w, "bob", cid, f"word {i}")["message_id"] for i in range(5)]
    first = w.do("alice", "search-messages", query="word", limit=2).data
    assert [m["message_id"] for m in first["messages"]] == sent[:2:-1][:2] and first["has_more"] is True
    rest = w.do(
        "alice",
        "search-messages",
        query="word",
        limit=10,
        before_message_id=first["messages"][-1]["message_id"],
    ).data
    assert [m["message_id"] for m in rest["messages"]] == sent[2::-1] and rest["has_more"] is False


@pytest.mark.parametrize("query", ["", "!!! ...", "x" * 201])
def test_search_queries_without_words_or_too_long_are_bad_requests(query: str) -> None:
    w, _ = world()
    assert w.do("alice", "search-messages", query=query).error == "bad-request"


def test_search_limit_bounds() -> None:
    w, _ = world()
    assert w.do("alice", "search-messages", query="a", limit=0).error == "bad-request"
    assert w.do("alice", "search-messages", query="a", limit=101).error == "bad-request"


# --- offline notifications --------------------------------------------------------------------


def test_offline_participants_get_a_notification_never_the_sender_never_global() -> None:
    w, cid = world()
    w.do("alice", "invite", conversation_id=cid, user_ids=["carol"])
    w.do("carol", "disconnect", session_id="carol-s")
    w.do("alice", "disconnect", session_id="alice-s")
    out = w.do("alice", "send-message", conversation_id=cid, body="é" * 150)
    notes = [d for d in out.deliveries if d.kind == "notification"]
    assert [d.key for d in notes] == ["carol"]
    data = notes[0].payload.model_dump(mode="json")
    assert data["type"] == "notification" and data["event_id"]
    assert data["data"]["preview"] == "é" * 100 and data["data"]["sender_id"] == "alice"
    assert not [
        d
        for d in w.do("bob", "send-message", conversation_id="global", body="x").deliveries
        if d.kind == "notification"
    ]


def test_a_reply_notifies_with_the_threads_conversation_id() -> None:
    w, cid = world()
    m = send(w, "alice", cid, "root")
    w.do("alice", "disconnect", session_id="alice-s")
    out = w.do("bob", "reply", message_id=m["message_id"], body="re")
    (note,) = [d.payload.model_dump(mode="json") for d in out.deliveries if d.kind == "notification"]
    assert note["data"]["conversation_id"] == out.data["message"]["conversation_id"] != cid
    assert note["data"]["user_id"] == "alice"
