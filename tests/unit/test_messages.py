"""Direct conversations, messages, idempotency and history."""

from __future__ import annotations

import pytest
from world import World


@pytest.fixture
def w() -> World:
    world = World()
    for user in ("alice", "bob", "carol"):
        world.do(user, "connect", session_id=f"{user}-1")
    return world


def direct(w: World, a: str = "alice", b: str = "bob") -> str:
    return str(
        w.do(a, "create-conversation", kind="direct", participants=[b]).data["conversation"][
            "conversation_id"
        ]
    )


def test_direct_conversation_reaches_both_and_its_topic(w: World) -> None:
    out = w.do("alice", "create-conversation", kind="direct", participants=["bob"], title="us")
    conv = out.data["conversation"]
    assert conv["kind"] == "direct" and conv["participants"] == ["alice", "bob"] and conv["last_seq"] == 0
    assert out.recipients("conversation-created") == ["alice", "bob"]
    assert out.inbox("bob")[0]["request_id"] is None
    assert out.conversation_topic(conv["conversation_id"]) == ["conversation-created"]


def test_direct_conversation_is_unique_per_pair_and_notifies_nobody_again(w: World) -> None:
    cid = direct(w)
    again = w.do("bob", "create-conversation", kind="direct", participants=["alice"])
    assert again.data["conversation"]["conversation_id"] == cid
    assert again.recipients("conversation-created") == ["bob"]
    assert again.conversation_topic(cid) == []


@pytest.mark.parametrize(
    ("participants", "code"),
    [
        (["alice"], "bad-request"),
        (["bob", "carol"], "bad-request"),
        (["zed"], "not-found"),
        ([], "bad-request"),
        (["bad id!"], "bad-request"),
    ],
)
def test_direct_conversation_rejections(w: World, participants: list[str], code: str) -> None:
    assert w.do("alice", "create-conversation", kind="direct", participants=participants).error == code


def test_messages_get_gapless_seqs_and_reach_the_other_participant(w: World) -> None:
    cid = direct(w)
    for i in range(1, 4):
        out = w.do("alice", "send-message", conversation_id=cid, body=f"m{i}")
        assert out.data["message"]["seq"] == i
        assert out.recipients("message-added") == ["alice", "bob"]
        assert out.conversation_topic(cid) == ["message-added"]
    assert "carol" not in out.recipients("message-added")


def test_client_msg_id_makes_sends_idempotent(w: World) -> None:
    cid = direct(w)
    first = w.do("alice", "send-message", conversation_id=cid, body="once", client_msg_id="c1")
    again = w.do("alice", "send-message", conversation_id=cid, body="once", client_msg_id="c1")
    assert again.data["message"] == first.data["message"]
    assert again.recipients("message-added") == ["alice"] and again.conversation_topic(cid) == []
    # The same client_msg_id from the other sender is a different message.
    other = w.do("bob", "send-message", conversation_id=cid, body="mine", client_msg_id="c1")
    assert other.data["message"]["seq"] == 2


def test_non_participants_get_not_found_never_forbidden(w: World) -> None:
    cid = direct(w)
    assert w.do("carol", "send-message", conversation_id=cid, body="x").error == "not-found"
    assert w.do("carol", "get-messages", conversation_id=cid, since_seq=0).error == "not-found"
    assert w.do("carol", "get-participants", conversation_id=cid).error == "not-found"
    assert w.do("carol", "send-message", conversation_id="nope", body="x").error == "not-found"


def test_global_conversation_reaches_users_with_a_live_session_and_the_others_catch_up(w: World) -> None:
    """Its cost never grows with users who are away: 1,000 known users cost nothing until they connect."""
    w.do("dave", "get-active-users")  # dave becomes known without connecting
    w.do("carol", "disconnect", session_id="carol-1")
    out = w.do("alice", "send-message", conversation_id="global", body="hello all")
    assert out.recipients("message-added") == ["alice", "bob"]
    assert out.conversation_topic("global") == ["message-added"]
    for away in ("carol", "dave"):
        history = w.do(away, "get-messages", conversation_id="global", since_seq=0).data["messages"]
        assert [m["body"] for m in history] == ["hello all"]
    root = out.data["message"]["message_id"]
    replied = w.do("bob", "reply", message_id=root, body="hi")
    assert replied.recipients("conversation-created") == ["alice", "bob"]
    assert replied.recipients("message-added") == ["alice", "bob"]


def test_get_messages_since_seq_pages_forward(w: World) -> None:
    cid = direct(w)
    for i in range(5):
        w.do("alice", "send-message", conversation_id=cid, body=f"m{i}")
    page = w.do("bob", "get-messages", conversation_id=cid, since_seq=1, limit=2).data
    assert [m["seq"] for m in page["messages"]] == [2, 3] and page["has_more"] is True
    last = w.do("bob", "get-messages", conversation_id=cid, since_seq=3, limit=2).data
    assert [m["seq"] for m in last["messages"]] == [4, 5] and last["has_more"] is False
    assert w.do("bob", "get-messages", conversation_id=cid, since_seq=5).data["messages"] == []


def test_get_messages_since_a_timestamp_is_exclusive(w: World) -> None:
    cid = direct(w)
    sent = [
        w.do("alice", "send-message", conversation_id=cid, body=f"m{i}").data["message"] for i in range(3)
    ]
    page = w.do("bob", "get-messages", conversation_id=cid, since=sent[0]["created_at"]).data
    assert [m["seq"] for m in page["messages"]] == [2, 3]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"since_seq": 0, "since": "2026-01-01T00:00:00Z"},
        {"since_seq": -1},
        {"since_seq": "3"},
        {"since_seq": 0, "limit": 0},
        {"since_seq": 0, "limit": 501},
        {"since": "yesterday"},
    ],
)
def test_get_messages_rejects_bad_cursors(w: World, fields: dict[str, object]) -> None:
    cid = direct(w)
    assert w.do("bob", "get-messages", conversation_id=cid, **fields).error == "bad-request"


def test_get_conversations_lists_global_and_mine(w: World) -> None:
    cid = direct(w)
    direct(w, "bob", "carol")
    convs = w.do("alice", "get-conversations").data["conversations"]
    assert [c["conversation_id"] for c in convs] == ["global", cid]


def test_commands_need_no_prior_connect_and_register_the_sender(w: World) -> None:
    out = w.do("zoe", "send-message", conversation_id="global", body="hi")
    assert out.answer["type"] == "message-added"
    assert w.do("alice", "create-conversation", kind="direct", participants=["zoe"]).answer["type"] == (
        "conversation-created"
    )
    assert "zoe" not in [u["user_id"] for u in w.do("alice", "get-active-users").data["users"]]


def test_a_sender_whose_first_command_failed_is_registered_by_its_next(w: World) -> None:
    assert w.raw("newbie", "send-message", b"not json").inbox("newbie")[0]["data"]["code"] == "bad-request"
    assert w.do("newbie", "send-message", conversation_id="nope", body="x").error == "not-found"
    assert w.do("newbie", "get-active-users").answer["type"] == "active-users"
    users = [
        u["user_id"] for u in w.do("alice", "get-participants", conversation_id="global").data["participants"]
    ]
    assert "newbie" in users
