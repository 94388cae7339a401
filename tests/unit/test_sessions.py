"""connect, disconnect, wills, presence, restarts."""

from __future__ import annotations

from world import World


def test_connect_answers_and_announces_the_user_to_every_active_user() -> None:
    w = World()
    first = w.do("alice", "connect", session_id="a1", display_name="Alice")
    assert first.answer["type"] == "connected"
    assert first.data["user"] == {"user_id": "alice", "display_name": "Alice", "active": True}
    assert first.data["session_id"] == "a1"
    assert [c["conversation_id"] for c in first.data["conversations"]] == ["global"]
    assert first.recipients("user-connected") == ["alice"]
    assert first.presence() == [("alice", "online")]

    second = w.do("bob", "connect", session_id="b1")
    assert second.recipients("user-connected") == ["alice", "bob"]
    assert [u["user_id"] for u in second.data["active_users"]] == ["alice", "bob"]
    assert all(e["request_id"] is None for e in second.inbox("alice"))


def test_second_session_of_an_active_user_announces_nothing() -> None:
    w = World()
    w.do("alice", "connect", session_id="a1")
    again = w.do("alice", "connect", session_id="a2")
    assert again.types("alice") == ["connected"]
    assert again.presence() == []


def test_last_session_ending_tells_everyone_and_sets_presence_offline() -> None:
    w = World()
    w.do("alice", "connect", session_id="a1")
    w.do("alice", "connect", session_id="a2")
    w.do("bob", "connect", session_id="b1")
    first = w.do("alice", "disconnect", session_id="a1", reason="client")
    assert first.deliveries == []  # alice still has a2
    last = w.do("alice", "disconnect", session_id="a2", reason="lost")
    assert last.recipients("user-disconnected") == ["bob"]
    assert last.inbox("bob")[0]["data"] == {"user_id": "alice"}
    assert last.presence() == [("alice", "offline")]
    assert [u["user_id"] for u in w.do("bob", "get-active-users").data["users"]] == ["bob"]


def test_stale_and_unknown_wills_change_nothing() -> None:
    w = World()
    w.do("alice", "connect", session_id="old")
    w.do("alice", "disconnect", session_id="old")
    w.do("alice", "connect", session_id="new")
    assert w.do("alice", "disconnect", session_id="old", reason="lost").deliveries == []
    assert w.do("alice", "disconnect", session_id="never", reason="lost").deliveries == []
    assert [u["user_id"] for u in w.do("alice", "get-active-users").data["users"]] == ["alice"]


def test_reconnect_with_the_same_session_id_is_a_re_announcement() -> None:
    w = World()
    w.do("alice", "connect", session_id="a1")
    again = w.do("alice", "connect", session_id="a1")
    assert again.types("alice") == ["connected"]


def test_sessions_not_re_announced_after_a_restart_expire() -> None:
    w = World(epoch="e1")
    w.do("alice", "connect", session_id="a1")
    w.do("bob", "connect", session_id="b1")
    w.restart(epoch="e2")
    w.do("bob", "connect", session_id="b1")  # bob re-announces; alice's client died meanwhile
    from world import Out

    expired = Out(w.service.expire_sessions().deliveries)
    assert expired.recipients("user-disconnected") == ["bob"]
    assert expired.presence() == [("alice", "offline")]
    assert Out(w.service.expire_sessions().deliveries).deliveries == []


def test_display_name_is_updated_by_a_later_connect() -> None:
    w = World()
    w.do("alice", "connect", session_id="a1", display_name="Al")
    out = w.do("alice", "connect", session_id="a2", display_name="Alice")
    assert out.data["user"]["display_name"] == "Alice"


def test_retained_presence_mode_tells_nobody_but_the_presence_topic() -> None:
    """`--presence retained`: a connect storm costs O(N) events; clients read presence/+ instead."""
    w = World(broadcast_presence=False)
    w.do("alice", "connect", session_id="a1")
    bob = w.do("bob", "connect", session_id="b1")
    assert bob.types("alice") == []  # no user-connected to the others
    assert bob.types("bob") == ["connected"]
    assert bob.data["active_users"] == []
    assert bob.data["user"]["active"] is True
    assert bob.presence() == [("bob", "online")]
    active = w.do("bob", "get-active-users")  # still answered on demand
    assert [u["user_id"] for u in active.data["users"]] == ["alice", "bob"]
    gone = w.do("alice", "disconnect", session_id="a1", reason="lost")
    assert gone.types("bob") == []
    assert gone.presence() == [("alice", "offline")]
