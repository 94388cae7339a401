"""Groups, invite, leave, remove, reply threads and backwards paging."""

from __future__ import annotations

import pytest
from world import World


@pytest.fixture
def w() -> World:
    world = World()
    for user in ("alice", "bob", "carol", "dave", "eve"):
        world.do(user, "connect", session_id=f"{user}-1")
    return world


def group(w: World, owner: str = "alice", members: tuple[str, ...] = ("bob", "carol")) -> str:
    out = w.do(owner, "create-conversation", kind="group", participants=list(members), title="team")
    return str(out.data["conversation"]["conversation_id"])


def test_group_owner_is_the_creator_and_everyone_is_told(w: World) -> None:
    out = w.do(
        "alice",
        "create-conversation",
        kind="group",
        participants=["bob", "carol", "bob", "alice"],
        title="team",
    )
    conv = out.data["conversation"]
    assert (conv["kind"], conv["owner_id"], conv["title"]) == ("group", "alice", "team")
    assert conv["participants"] == ["alice", "bob", "carol"]
    assert out.recipients("conversation-created") == ["alice", "bob", "carol"]


def test_group_with_an_unknown_user_is_not_found_and_creates_nothing(w: World) -> None:
    assert (
        w.do("alice", "create-conversation", kind="group", participants=["bob", "ghost"]).error == "not-found"
    )
    assert len(w.do("alice", "get-conversations").data["conversations"]) == 1


def test_any_participant_may_invite_and_everyone_is_told(w: World) -> None:
    cid = group(w)
    out = w.do("bob", "invite", conversation_id=cid, user_ids=["dave", "carol"])
    assert out.answer["type"] == "participants-added"
    assert out.data == {"conversation_id": cid, "user_ids": ["dave"]}
    assert out.recipients("participants-added") == ["alice", "bob", "carol"]
    assert out.recipients("conversation-created") == ["dave"]
    created = out.inbox("dave")[0]["data"]["conversation"]
    assert created["participants"] == ["alice", "bob", "carol", "dave"]
    assert out.conversation_topic(cid) == ["participants-added"]


def test_invite_rules(w: World) -> None:
    cid = group(w)
    assert w.do("eve", "invite", conversation_id=cid, user_ids=["dave"]).error == "not-found"
    assert w.do("bob", "invite", conversation_id=cid, user_ids=["ghost"]).error == "not-found"
    assert w.do("bob", "invite", conversation_id="global", user_ids=["dave"]).error == "forbidden"
    dm = w.do("alice", "create-conversation", kind="direct", participants=["bob"]).data["conversation"]
    assert (
        w.do("alice", "invite", conversation_id=dm["conversation_id"], user_ids=["dave"]).error == "forbidden"
    )
    root = w.do("alice", "send-message", conversation_id=cid, body="root").data["message"]
    thread = w.do("bob", "reply", message_id=root["message_id"], body="re").data["message"]["conversation_id"]
    assert w.do("alice", "invite", conversation_id=thread, user_ids=["dave"]).error == "forbidden"


def test_leave_tells_the_remaining_participants(w: World) -> None:
    cid = group(w)
    out = w.do("bob", "leave", conversation_id=cid)
    assert out.answer["type"] == "participant-left"
    assert out.recipients("participant-left") == ["alice", "bob", "carol"]
    assert w.do("bob", "send-message", conversation_id=cid, body="x").error == "not-found"


def test_owner_leaving_removes_the_group_for_everyone(w: World) -> None:
    cid = group(w)
    out = w.do("alice", "leave", conversation_id=cid)
    assert out.answer["type"] == "conversation-removed"
    assert out.recipients("conversation-removed") == ["alice", "bob", "carol"]
    assert w.do("bob", "get-messages", conversation_id=cid, since_seq=0).error == "not-found"


def test_leave_rules(w: World) -> None:
    dm = w.do("alice", "create-conversation", kind="direct", participants=["bob"]).data["conversation"]
    assert w.do("alice", "leave", conversation_id=dm["conversation_id"]).error == "forbidden"
    assert w.do("alice", "leave", conversation_id="global").error == "forbidden"
    assert w.do("eve", "leave", conversation_id=group(w)).error == "not-found"


def test_remove_is_for_the_owner_and_takes_threads_and_messages(w: World) -> None:
    cid = group(w)
    root = w.do("bob", "send-message", conversation_id=cid, body="root").data["message"]
    thread = w.do("carol", "reply", message_id=root["message_id"], body="re").data["message"]
    assert w.do("bob", "remove-conversation", conversation_id=cid).error == "forbidden"
    assert w.do("eve", "remove-conversation", conversation_id=cid).error == "not-found"
    out = w.do("alice", "remove-conversation", conversation_id=cid)
    assert out.recipients("conversation-removed") == ["alice", "bob", "carol"]
    assert out.conversation_topic(thread["conversation_id"]) == ["conversation-removed"]
    assert w.do("bob", "get-messages", conversation_id=cid, since_seq=0).error == "not-found"
    assert (
        w.do("bob", "get-messages", conversation_id=thread["conversation_id"], since_seq=0).error
        == "not-found"
    )
    assert w.do("bob", "reply", message_id=root["message_id"], body="late").error == "not-found"
    assert [c["conversation_id"] for c in w.do("bob", "get-conversations").data["conversations"]] == [
        "global"
    ]


def test_remove_rules_for_other_kinds(w: World) -> None:
    dm = w.do("alice", "create-conversation", kind="direct", participants=["bob"]).data["conversation"]
    assert w.do("alice", "remove-conversation", conversation_id=dm["conversation_id"]).error == "forbidden"
    assert w.do("alice", "remove-conversation", conversation_id="global").error == "forbidden"


def test_first_reply_creates_the_thread_before_the_message(w: World) -> None:
    cid = group(w)
    root = w.do("bob", "send-message", conversation_id=cid, body="root").data["message"]
    out = w.do("carol", "reply", message_id=root["message_id"], body="first")
    assert out.types("carol") == ["conversation-created", "message-added"]
    assert out.types("alice") == ["conversation-created", "message-added"]
    thread = out.inbox("alice")[0]["data"]["conversation"]
    assert thread["kind"] == "thread"
    assert (thread["parent_conversation_id"], thread["parent_message_id"]) == (cid, root["message_id"])
    assert thread["participants"] == ["alice", "bob", "carol"]
    assert out.answer["type"] == "message-added"
    assert (
        out.data["message"]["conversation_id"] == thread["conversation_id"]
        and out.data["message"]["seq"] == 1
    )

    second = w.do("alice", "reply", message_id=root["message_id"], body="second")
    assert second.types("bob") == ["message-added"]
    assert second.data["message"]["conversation_id"] == thread["conversation_id"]
    nested = w.do("bob", "reply", message_id=out.data["message"]["message_id"], body="to a reply")
    assert nested.data["message"]["conversation_id"] == thread["conversation_id"]
    assert nested.data["message"]["seq"] == 3


def test_thread_participants_follow_the_parent(w: World) -> None:
    cid = group(w)
    root = w.do("bob", "send-message", conversation_id=cid, body="root").data["message"]
    tid = w.do("carol", "reply", message_id=root["message_id"], body="re").data["message"]["conversation_id"]
    w.do("alice", "invite", conversation_id=cid, user_ids=["dave"])
    w.do("carol", "leave", conversation_id=cid)
    members = [
        u["user_id"] for u in w.do("dave", "get-participants", conversation_id=tid).data["participants"]
    ]
    assert members == ["alice", "bob", "dave"]
    assert w.do("carol", "get-messages", conversation_id=tid, since_seq=0).error == "not-found"
    assert tid in [c["conversation_id"] for c in w.do("dave", "get-conversations").data["conversations"]]


def test_reply_to_an_invisible_or_missing_message_is_not_found(w: World) -> None:
    cid = group(w)
    root = w.do("bob", "send-message", conversation_id=cid, body="root").data["message"]
    assert w.do("eve", "reply", message_id=root["message_id"], body="x").error == "not-found"
    assert w.do("eve", "reply", message_id="m_nope", body="x").error == "not-found"


def test_get_participants_of_global_is_every_known_user(w: World) -> None:
    w.do("eve", "disconnect", session_id="eve-1")
    users = w.do("alice", "get-participants", conversation_id="global").data["participants"]
    assert [u["user_id"] for u in users] == ["alice", "bob", "carol", "dave", "eve"]
    assert [u["active"] for u in users] == [True, True, True, True, False]


def test_get_prior_messages_pages_backwards_from_the_newest(w: World) -> None:
    cid = group(w)
    for i in range(1, 8):
        w.do("alice", "send-message", conversation_id=cid, body=f"m{i}")
    newest = w.do("bob", "get-prior-messages", conversation_id=cid, limit=3).data
    assert [m["seq"] for m in newest["messages"]] == [5, 6, 7] and newest["has_more"] is True
    older = w.do("bob", "get-prior-messages", conversation_id=cid, before_seq=5, limit=3).data
    assert [m["seq"] for m in older["messages"]] == [2, 3, 4] and older["has_more"] is True
    first = w.do("bob", "get-prior-messages", conversation_id=cid, before_seq=2, limit=3).data
    assert [m["seq"] for m in first["messages"]] == [1] and first["has_more"] is False
    assert w.do("bob", "get-prior-messages", conversation_id=cid, limit=501).error == "bad-request"
    default = w.do("bob", "get-prior-messages", conversation_id=cid).data
    assert [m["seq"] for m in default["messages"]] == list(range(1, 8))


def test_threads_of_the_global_conversation_are_everyones(w: World) -> None:
    root = w.do("alice", "send-message", conversation_id="global", body="root").data["message"]
    out = w.do("bob", "reply", message_id=root["message_id"], body="re")
    thread = out.inbox("bob")[0]["data"]["conversation"]
    assert thread["participants"] == []  # like its parent: empty means everyone
    assert out.recipients("conversation-created") == ["alice", "bob", "carol", "dave", "eve"]
    tid = thread["conversation_id"]
    assert [
        m["body"] for m in w.do("eve", "get-messages", conversation_id=tid, since_seq=0).data["messages"]
    ] == ["re"]
    assert tid in [c["conversation_id"] for c in w.do("carol", "get-conversations").data["conversations"]]
