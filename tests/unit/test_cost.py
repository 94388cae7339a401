"""Cost, not count: a user's commands are limited by the events they cause, so that nobody within the
command rate can slow everyone else by fanning out."""

from __future__ import annotations

import orjson
import pytest
from world import World

from bridge.limits import CostBudget
from bridge.memory import MemoryStore
from bridge.model import ChatSession, User
from bridge.service import Inbound


def crowd(w: World, count: int, online: bool) -> list[str]:
    store = w.uow.store  # type: ignore[attr-defined]
    assert isinstance(store, MemoryStore)
    ids = [f"u{i:04d}" for i in range(count)]
    for u in ids:
        store.save_user(User(u, None, 0))
        if online:
            store.save_session(ChatSession(u, "s", "e1", 0))
    return ids


def test_a_message_to_100_people_costs_100() -> None:
    w = World()
    w.now = 1_000_000
    members = crowd(w, 99, online=False)
    cid = w.do("alice", "create-conversation", kind="group", participants=members).data["conversation"][
        "conversation_id"
    ]
    w.do("bob", "connect", session_id="b1")
    w.do("alice", "create-conversation", kind="direct", participants=["bob"])
    w.service.cost = CostBudget(rate=100, burst=300, total=1_000_000)
    sent = [w.do("alice", "send-message", conversation_id=cid, body=f"m{i}") for i in range(4)]
    # each costs 200 (the answer, 99 others, the conversation topic, and a notification for each of the
    # 99, who are offline): the first leaves 100 of the 300, the second runs into debt, the rest wait
    assert [o.answer["type"] for o in sent] == ["message-added"] * 2 + ["error"] * 2
    assert len([d for d in sent[0].deliveries if d.kind == "notification"]) == 99
    refused = sent[3].answer["data"]
    assert refused["code"] == "rate-limited" and "events" in refused["message"]
    assert 0 < refused["retry_after"] <= 1.0  # a debt of 100 at 100/s
    assert len(sent[3].deliveries) == 1  # nothing for anyone else, nothing stored
    # the same 4 commands into a direct conversation would have cost 12: the count is not the point
    assert w.do("bob", "get-active-users").answer["type"] == "active-users"  # bob is not affected
    w.now += 2_000
    assert w.do("alice", "send-message", conversation_id=cid, body="later").answer["type"] == "message-added"


def test_light_users_come_first_while_the_bridge_wide_budget_is_spent() -> None:
    w = World()
    w.now = 1_000_000
    members = crowd(w, 50, online=True)  # online: no offline notifications, 52 events per message
    w.service.cost = CostBudget(rate=100, burst=200, total=150)
    groups = {}
    for heavy in ("m1", "m2", "m3", "m4"):
        groups[heavy] = w.do(heavy, "create-conversation", kind="group", participants=members).data[
            "conversation"
        ]["conversation_id"]
    w.now += 10_000  # everyone's budget full again
    for heavy in ("m1", "m2", "m3"):
        assert w.do(heavy, "send-message", conversation_id=groups[heavy], body="x").answer["type"] == (
            "message-added"
        )  # 52 each
    # 3 x 52 of the bridge's 150/s: the bridge-wide budget is spent. The heavy users (their last
    # command cost a tenth of their rate or more) wait, though their own budgets are not in debt;
    # bob, who spent nothing, is served at once.
    for heavy in ("m4", "m1"):
        refused = w.do(heavy, "send-message", conversation_id=groups[heavy], body="y")
        assert refused.error == "rate-limited" and 0 < refused.answer["data"]["retry_after"] <= 1
    assert w.do("bob", "send-message", conversation_id="global", body="hi").answer["type"] == "message-added"
    w.now += 1_000  # the bridge-wide budget refilled: heavy users are served again
    assert w.do("m4", "send-message", conversation_id=groups["m4"], body="y").answer["type"] == (
        "message-added"
    )


def test_queued_commands_are_never_cost_refused() -> None:
    w = World()
    w.now = 1_000_000
    crowd(w, 200, online=True)
    w.service.cost = CostBudget(rate=10, burst=10, total=10)
    backlog = [
        Inbound(
            "alice",
            "send-message",
            orjson.dumps({"conversation_id": "global", "body": f"m{i}", "request_id": f"q{i}"}),
            queued=True,
        )
        for i in range(20)
    ]
    batch = w.service.handle_batch(backlog)
    answers = [d.payload for d in batch.deliveries if d.kind == "inbox" and d.key == "alice"]
    assert [a.type for a in answers] == ["message-added"] * 20  # type: ignore[attr-defined]


def test_presence_flapping_does_not_fan_out_to_everyone_at_its_own_pace() -> None:
    """connect/disconnect 25 times a second with 1,000 users online: presence events to the others are
    bounded by the flapper's budget, and every connect is still answered."""
    w = World()
    crowd(w, 1000, online=True)
    w.service.cost = CostBudget(rate=500, burst=2000, total=100_000)
    w.now = 1_000_000
    fanned = answered = 0
    for i in range(50):  # 2 s at 25 connect/disconnect pairs per second
        w.now += 40
        out = w.do("flapper", "connect", session_id=f"f{i}", request_id=f"c{i}")
        answered += len([e for e in out.inbox("flapper") if e["request_id"] == f"c{i}"])
        fanned += len(out.recipients("user-connected"))
        out = w.do("flapper", "disconnect", session_id=f"f{i}", reason="lost")
        fanned += len(out.recipients("user-disconnected"))
    assert answered == 50  # every connect answered (connected or rate-limited)
    # without a budget: 2 x 50 x 1,000 = 100,000 events; with it, the burst plus 2 s at 500/s, and one
    # connect/disconnect pair of overshoot
    assert fanned <= 2000 + 2 * 500 + 2 * 1001


def test_a_batch_that_does_not_commit_spends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch will be retried (a storage outage): its commands must not also be charged twice."""
    w = World()
    w.now = 1_000_000
    crowd(w, 200, online=True)
    w.service.cost = CostBudget(rate=1, burst=100, total=1_000_000)
    store = w.uow.store  # type: ignore[attr-defined]
    real = store.add_outbox
    failures = iter([RuntimeError("disk full")])

    def add_outbox(entries: object) -> None:
        for exc in failures:
            raise exc
        real(entries)

    monkeypatch.setattr(store, "add_outbox", add_outbox)
    item = Inbound("alice", "send-message", orjson.dumps({"conversation_id": "global", "body": "x"}))
    with pytest.raises(RuntimeError):
        w.service.handle_batch([item])
    retried = w.service.handle_batch([item])  # admitted: the failed attempt cost nothing
    assert next(d.payload.type for d in retried.deliveries if d.key == "alice") == "message-added"  # type: ignore[attr-defined]
    again = w.service.handle_batch([item])  # now alice is in debt (201 > 100)
    assert [d.payload.type for d in again.deliveries] == ["error"]  # type: ignore[attr-defined]


def test_a_page_of_history_costs_what_it_read() -> None:
    """A page of 300 messages costs 301, as a message to 300 people would: a user asking for pages as
    fast as the command rate allows cannot keep the database busy for everybody else."""
    w = World()
    w.now = 1_000_000
    for i in range(300):
        w.do("bob", "send-message", conversation_id="global", body=f"m{i}")
    w.service.cost = CostBudget(rate=100, burst=400, total=1_000_000)
    pages = [
        w.do("alice", "get-messages", conversation_id="global", since_seq=0, limit=300) for _ in range(3)
    ]
    # the first leaves 99 of the 400, the second runs into debt, the third waits
    assert [o.answer["type"] for o in pages] == ["messages", "messages", "error"]
    assert len(pages[0].answer["data"]["messages"]) == 300
    refused = pages[2].answer["data"]
    assert refused["code"] == "rate-limited" and 1.0 < refused["retry_after"] <= 2.1  # a debt of 202 at 100/s
    assert w.do("bob", "get-active-users").answer["type"] == "active-users"  # bob is not affected
    w.now += 2_100
    assert w.do("alice", "get-messages", conversation_id="global", since_seq=290).answer["type"] == "messages"


def test_a_page_costs_the_messages_it_read_even_when_fewer_fit() -> None:
    """Large messages: fewer than `limit` fit an answer, but all `limit` were read for it."""
    w = World()
    w.now = 1_000_000
    for i in range(300):
        w.do("bob", "send-message", conversation_id="global", body=f"{i:04d}" + "x" * 4000)
    w.service.cost = CostBudget(rate=100, burst=400, total=1_000_000)
    pages = [
        w.do("alice", "get-messages", conversation_id="global", since_seq=0, limit=300) for _ in range(3)
    ]
    assert len(pages[0].answer["data"]["messages"]) < 100  # cut to fit the event size
    assert [o.answer["type"] for o in pages] == ["messages", "messages", "error"]


def test_a_catch_up_of_many_quiet_conversations_is_cheap() -> None:
    """A client back from a reconnect asks each of its conversations for what it missed, with a large
    limit: pages that reach the end cost what they carry, not the limit (the SDKs' catch-up pages ask
    for 500; charged 501 each, the second conversation's catch-up was refused)."""
    w = World()
    w.now = 1_000_000
    for i in range(5):
        w.do("bob", "send-message", conversation_id="global", body=f"m{i}")
    w.service.cost = CostBudget(rate=100, burst=400, total=1_000_000)
    pages = [
        w.do("alice", "get-messages", conversation_id="global", since_seq=0, limit=500) for _ in range(20)
    ]
    assert [o.answer["type"] for o in pages] == ["messages"] * 20
    assert all(len(o.answer["data"]["messages"]) == 5 for o in pages)
