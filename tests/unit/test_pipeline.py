"""The pipeline against the fake transport: ordering, backpressure, outages, poison events, restarts,
the self-probe and the graceful stop. Histories of commands; the test plays the broker."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from bridge.limits import RateLimiter
from bridge.memory import MemoryUnitOfWork
from bridge.pipeline import Pipeline
from bridge.service import Service
from bridge.topics import Topics
from bridge.transport import Command, Event, FakeTransport

TOPICS = Topics("chat/v1")


class Down(Exception):
    """The storage outage of these tests."""


class FlakyUnitOfWork:
    def __init__(self) -> None:
        self.inner = MemoryUnitOfWork()
        self.down = False
        self.attempts = 0

    def transaction(self) -> Any:
        self.attempts += 1
        if self.down:
            raise Down("database is down")
        return self.inner.transaction()


class Harness:
    def __init__(
        self,
        uow: Any = None,
        *,
        limiter: RateLimiter | None = None,
        transport: FakeTransport | None = None,
        **options: Any,
    ) -> None:
        self.uow = uow or MemoryUnitOfWork()
        ids = itertools.count(1)
        self.service = Service(
            self.uow,
            epoch="e1",
            ids=lambda prefix: f"{prefix}_{next(ids)}",
            transient=(Down,),
            limiter=limiter,
        )
        self.transport = transport or FakeTransport()
        options.setdefault("retry_delays", (0.001, 0.005))
        options.setdefault("stop_timeout", 0.05)
        self.pipeline = Pipeline(
            self.service,
            self.transport,
            TOPICS,
            is_transient=lambda exc: isinstance(exc, Down),
            **options,
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, connect: bool = True) -> Harness:
        self.task = asyncio.create_task(self.pipeline.run())
        await asyncio.sleep(0)
        if connect:
            self.transport.connect()
            await until(self.pipeline.ready.is_set)
        return self

    async def stop(self) -> None:
        self.pipeline.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    def send(self, user: str, command: str, *, retain: bool = False, **fields: Any) -> Command:
        cmd = self.transport.command(TOPICS.command(user, command), orjson.dumps(fields), retain=retain)
        self.transport.deliver(cmd)
        return cmd

    def inbox(self, user: str) -> list[dict[str, Any]]:
        return [orjson.loads(e.payload) for e in self.events() if e.topic == TOPICS.inbox(user)]

    def events(self) -> list[Event]:
        return [e for e, _ in self.transport.published if "/commands/" not in e.topic]

    def answers(self, user: str) -> list[str]:
        return [e["request_id"] for e in self.inbox(user) if e.get("request_id")]

    def outbox(self) -> int:
        return len(self.uow.inner.store._s.outbox if hasattr(self.uow, "inner") else self.uow.store._s.outbox)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(wait(), timeout)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def sync() -> None:
        asyncio.run(asyncio.wait_for(test(), 10))

    sync.__name__ = test.__name__
    sync.__doc__ = test.__doc__
    return sync


def loop_probes(transport: FakeTransport) -> None:
    """The broker routes the bridge's probes back to its command subscription."""
    transport.loopback = lambda event: event.topic == TOPICS.command("chat-bridge", "probe")


@run
async def test_commands_are_answered_in_order_and_acknowledged_after_commit() -> None:
    h = await Harness().start()
    h.send("alice", "connect", session_id="a1", request_id="c")
    for i in range(20):
        h.send("alice", "send-message", conversation_id="global", body=f"m{i}", request_id=f"r{i}")
    await until(lambda: len(h.transport.acked) == 21)
    await until(lambda: len(h.answers("alice")) == 21)
    assert h.answers("alice") == ["c", *(f"r{i}" for i in range(20))]
    bodies = [e["data"]["message"]["body"] for e in h.inbox("alice") if e["type"] == "message-added"]
    assert bodies == [f"m{i}" for i in range(20)]
    await h.stop()


@run
async def test_online_is_announced_retained_and_offline_on_stop() -> None:
    h = await Harness().start()
    status = [e for e in h.events() if e.topic == TOPICS.status]
    assert status and status[0].retain and orjson.loads(status[0].payload)["status"] == "online"
    await h.stop()
    assert h.transport.closed and h.transport.farewell is not None
    assert orjson.loads(h.transport.farewell.payload)["status"] == "offline"


@run
async def test_a_full_publish_window_holds_new_commands_unacknowledged() -> None:
    h = await Harness(transport=FakeTransport(auto_complete=False), publish_window=3).start()
    h.transport.complete()  # status and probe
    h.send("alice", "connect", session_id="a1", request_id="c")  # connected + user-connected + presence
    await until(lambda: len(h.transport.acked) == 1)
    h.send("alice", "get-active-users", request_id="g")
    await asyncio.sleep(0.02)
    assert h.transport.acked == [orjson.dumps({"session_id": "a1", "request_id": "c"}).decode()]
    assert "g" not in h.answers("alice")
    h.transport.complete()
    await until(lambda: "g" in h.answers("alice"))
    assert len(h.transport.acked) == 2
    await h.stop()


@run
async def test_storage_outage_leaves_commands_unacknowledged_then_applies_them() -> None:
    uow = FlakyUnitOfWork()
    h = await Harness(uow).start()
    uow.down = True
    h.send("alice", "send-message", conversation_id="global", body="kept", request_id="k")
    await until(lambda: uow.attempts >= 3)
    assert h.transport.acked == [] and h.answers("alice") == []
    uow.down = False
    await until(lambda: h.answers("alice") == ["k"])
    assert len(h.transport.acked) == 1
    await h.stop()


@run
async def test_stopping_during_an_outage_acknowledges_nothing() -> None:
    uow = FlakyUnitOfWork()
    h = await Harness(uow).start()
    uow.down = True
    h.send("alice", "send-message", conversation_id="global", body="kept", request_id="k")
    await until(lambda: uow.attempts >= 2)
    await h.stop()
    assert h.transport.acked == []


@run
async def test_events_lost_with_the_connection_go_again_in_order() -> None:
    h = await Harness(transport=FakeTransport(auto_complete=False)).start()
    h.transport.complete()
    for i in range(5):
        h.send("alice", "send-message", conversation_id="global", body=f"m{i}", request_id=f"r{i}")
    await until(lambda: len(h.transport.acked) == 5)
    h.transport.complete(2)
    h.transport.drop_connection()
    h.send("alice", "get-active-users", request_id="late")  # applied while the broker is away
    await until(lambda: len(h.transport.acked) == 6)
    before = len(h.events())

    def again() -> list[str]:
        return [
            r
            for e in h.events()[before:]
            if e.topic.endswith("/inbox") and (r := orjson.loads(e.payload)["request_id"])
        ]

    h.transport.connect()
    await until(lambda: "late" in again())
    # r0 and r1 went to alice's inbox and the conversation: two taken, the rest go again
    assert again() == ["r1", "r2", "r3", "r4", "late"]
    h.transport.complete()
    await until(lambda: h.pipeline.status.backlog == 0)
    await h.stop()


@run
async def test_an_event_the_broker_refuses_is_set_aside_and_the_rest_flows() -> None:
    refuse = lambda event: b"huge" in event.payload  # noqa: E731
    h = await Harness(transport=FakeTransport(refuse=refuse)).start()
    h.send("alice", "send-message", conversation_id="global", body="huge" * 10, request_id="big")
    h.send("alice", "send-message", conversation_id="global", body="small", request_id="ok")
    await until(lambda: "ok" in h.answers("alice"))
    assert h.pipeline.status.events_set_aside == 2  # alice's answer and the conversation's copy
    await until(lambda: h.pipeline.status.backlog == 0)
    await h.stop()
    assert h.outbox() == 0  # nothing left to publish again at the next start


@run
async def test_an_event_the_broker_disconnects_on_is_set_aside_after_three_strikes() -> None:
    """Like Mosquitto with an event over its max_packet_size: it closes the connection every time."""
    transport = FakeTransport(auto_complete=False)
    h = await Harness(transport=transport, poison_after=3).start()
    transport.complete()
    h.send("alice", "send-message", conversation_id="global", body="poison" * 300, request_id="p")
    h.send("alice", "send-message", conversation_id="global", body="fine", request_id="f")
    await until(lambda: len(transport.acked) == 2)

    def poisoned() -> bool:
        return any(b"poison" in e.payload for e, _ in transport.pending())

    drops = 0
    while poisoned() and drops < 10:  # the answer to alice, then the conversation's copy
        transport.drop_connection("broker closed the connection")
        transport.connect()
        drops += 1
        await asyncio.sleep(0.005)
    assert drops == 3  # the second copy is as large: set aside without costing a connection
    assert h.pipeline.status.events_set_aside == 2
    transport.complete()
    assert "f" in h.answers("alice")
    await until(lambda: h.pipeline.status.backlog == 0)
    await h.stop()


@run
async def test_an_outage_without_a_culprit_sets_nothing_aside() -> None:
    """A broker restart while events were in flight for a while: no strike (sent long before the drop)."""
    clock = [0.0]
    transport = FakeTransport(auto_complete=False)
    h = await Harness(transport=transport, clock=lambda: clock[0]).start()
    transport.complete()
    h.send("alice", "get-active-users", request_id="g")
    await until(lambda: len(transport.acked) == 1)
    for _ in range(5):
        clock[0] += 10
        transport.drop_connection()
        transport.connect()
        await asyncio.sleep(0.005)
    assert h.pipeline.status.events_set_aside == 0
    transport.complete()
    await until(lambda: h.pipeline.status.backlog == 0)
    await h.stop()


@run
async def test_a_restart_publishes_what_the_outbox_kept_and_a_graceful_stop_forgets_it() -> None:
    uow = MemoryUnitOfWork()
    first = await Harness(uow, transport=FakeTransport(auto_complete=False)).start()
    first.transport.complete()
    first.send("alice", "send-message", conversation_id="global", body="once", request_id="o")
    await until(lambda: len(first.transport.acked) == 1)
    first.transport.drop_connection()  # the events never reached the broker
    await first.stop()
    assert first.outbox() > 0

    second = await Harness(uow).start()
    await until(lambda: "o" in second.answers("alice"))
    await until(lambda: second.pipeline.status.backlog == 0)
    await second.stop()  # graceful: forgets what the broker took
    assert second.outbox() == 0

    third = await Harness(uow).start()
    await asyncio.sleep(0.01)
    assert third.answers("alice") == []  # nothing published twice
    await third.stop()


@run
async def test_graceful_stop_right_after_an_answer_forgets_its_outbox_rows() -> None:
    h = await Harness().start()
    h.send("alice", "get-active-users", request_id="g")
    await until(lambda: "g" in h.answers("alice"))
    await h.stop()  # within the idle tidy-up interval
    assert h.outbox() == 0


@run
async def test_commands_before_the_probe_returns_are_the_queued_backlog() -> None:
    """Queued commands are never rate-limited (the broker's guard limited them at publish time)."""
    transport = FakeTransport()
    h = Harness(transport=transport, limiter=RateLimiter(1, 2))
    await h.start(connect=False)
    transport.connect()
    await until(h.pipeline.ready.is_set)
    probe = next(e for e, _ in transport.published if e.topic.endswith("/chat-bridge/commands/probe"))
    for i in range(6):  # the backlog the broker queued while the bridge was away
        h.send("alice", "get-active-users", request_id=f"q{i}")
    transport.deliver(transport.command(probe.topic, probe.payload))  # the probe comes back last
    for i in range(6):
        h.send("alice", "get-active-users", request_id=f"n{i}")
    await until(lambda: len(transport.acked) == 13)
    answers = {e["request_id"]: e["type"] for e in h.inbox("alice")}
    assert all(answers[f"q{i}"] == "active-users" for i in range(6))
    assert [answers.get(f"n{i}") for i in range(6)].count("active-users") == 2  # the burst
    assert h.pipeline.status.queued_commands == 6
    await h.stop()


@run
async def test_a_lost_subscription_is_noticed_and_renewed() -> None:
    transport = FakeTransport()
    loop_probes(transport)
    h = await Harness(transport=transport, probe_interval=0.02, probe_timeout=0.02).start()
    await asyncio.sleep(0.1)
    assert transport.resubscribes == 0  # probes come back
    transport.loopback = lambda event: False  # the broker silently dropped the subscription
    await until(lambda: transport.resubscribes == 1)
    await until(lambda: transport.reconnects >= 1, timeout=3)
    assert h.pipeline.status.probes_lost >= 2
    loop_probes(transport)  # reconnected and subscribed again
    await until(lambda: h.pipeline._probe_failures == 0, timeout=3)
    await h.stop()


@run
async def test_ignored_messages_are_acknowledged_and_warned_about_once_a_minute() -> None:
    h = await Harness().start()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("bridge.pipeline").addHandler(handler)
    try:
        for _ in range(50):
            h.transport.deliver(h.transport.command("chat/v1/users/bad id/commands/connect", b"{}"))
        h.send("alice", "connect", session_id="a", retain=True)
        await until(lambda: len(h.transport.acked) == 51)
    finally:
        logging.getLogger("bridge.pipeline").removeHandler(handler)
    assert len([r for r in records if r.levelno == logging.WARNING]) == 2  # one per kind
    assert h.pipeline.status.ignored_messages == 51
    assert h.answers("alice") == []
    await h.stop()


@run
async def test_a_broker_that_cannot_be_reached_is_reported_at_once() -> None:
    h = await Harness().start(connect=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("bridge.pipeline").addHandler(handler)
    try:
        for _ in range(5):
            h.pipeline.disconnected("mqtt://127.0.0.1:1: [Errno 111] Connection refused")
    finally:
        logging.getLogger("bridge.pipeline").removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1:1" in warnings[0] and "refused" in warnings[0]
    assert h.pipeline.status.broker_error and "refused" in h.pipeline.status.broker_error
    await h.stop()


@run
async def test_typing_goes_out_at_qos_0_acknowledged_never_stored() -> None:
    h = await Harness().start()
    h.send("alice", "connect", session_id="a1", request_id="c")
    h.send("bob", "connect", session_id="b1", request_id="c")
    h.send("alice", "create-conversation", kind="direct", participants=["bob"], request_id="d")
    await until(lambda: len(h.answers("alice")) == 2)
    cid = next(e for e in h.inbox("alice") if e["type"] == "conversation-created")["data"]["conversation"][
        "conversation_id"
    ]
    acked = len(h.transport.acked)
    h.send("alice", "typing", conversation_id=cid, typing=True, request_id="t")
    await until(lambda: any(e["type"] == "typing" for e in h.inbox("bob")))
    await until(lambda: len(h.transport.acked) == acked + 1)
    (typing,) = [e for e in h.events() if b'"typing"' in e.payload and e.topic == TOPICS.inbox("bob")]
    assert typing.qos == 0 and not typing.retain
    assert "t" not in h.answers("alice"), "a successful typing is not answered"
    assert all(b'"typing"' not in e.payload for e in h.uow.store._s.outbox)
    await h.stop()


@run
async def test_a_user_with_thousands_waiting_delays_anothers_command_by_one_batch_at_most() -> None:
    """Fair turns: each batch takes a command of every waiting user in turn, so bob's command, arriving
    behind 600 of mallory's, is in the next batch (first come first served made it wait for all 600);
    each user's commands keep their order."""
    h = await Harness(batch_max=8).start()
    for user in ("mallory", "bob"):
        h.send(user, "connect", session_id="s", request_id=f"c-{user}")
    await until(lambda: len(h.transport.acked) == 2)
    flood = [
        h.transport.command(
            TOPICS.command("mallory", "send-message"),
            orjson.dumps({"conversation_id": "global", "body": f"spam {i}", "request_id": f"m{i}"}),
        )
        for i in range(600)
    ]
    h.transport.deliver(*flood)
    h.send("bob", "send-message", conversation_id="global", body="hi", request_id="b")
    await until(lambda: len(h.transport.acked) == 603)
    inboxes = (TOPICS.inbox("mallory"), TOPICS.inbox("bob"))
    answers = [str(orjson.loads(e.payload).get("request_id")) for e in h.events() if e.topic in inboxes]
    answered = [r for r in answers if r == "b" or r.startswith("m")]
    assert answered.index("b") <= 8, answered.index("b")
    assert [r for r in answered if r != "b"] == [f"m{i}" for i in range(600)]
    await h.stop()


@run
async def test_commands_over_the_rate_limit_are_refused_on_arrival_without_waiting_their_turn() -> None:
    """A flooder's refused commands take no turn of the pipeline: they are answered and acknowledged on
    arrival, even while a batch waits for the database, and never wait behind admitted commands."""
    uow, transport = FlakyUnitOfWork(), FakeTransport()
    loop_probes(transport)  # past the broker's queued backlog, which is never rate-limited
    h = await Harness(uow, limiter=RateLimiter(0.01, 5), transport=transport).start()
    await until(lambda: h.pipeline.status.probes_returned == 1)
    h.send("mallory", "connect", session_id="s", request_id="c")
    await until(lambda: len(h.transport.acked) == 1)
    uow.down = True
    for i in range(50):
        h.send("mallory", "send-message", conversation_id="global", body=f"spam {i}", request_id=f"m{i}")
    h.send("bob", "send-message", conversation_id="global", body="hi", request_id="b")
    # storage is down: the four of mallory's within her burst and bob's wait; the 46 over it do not
    await until(lambda: len(h.transport.acked) == 1 + 46)
    refused = [e for e in h.inbox("mallory") if (e.get("request_id") or "").startswith("m")]
    assert [e["request_id"] for e in refused] == [f"m{i}" for i in range(4, 50)]
    assert all(e["type"] == "error" and e["data"]["code"] == "rate-limited" for e in refused)
    assert h.answers("bob") == []
    uow.down = False
    await until(lambda: "b" in h.answers("bob") and len(h.transport.acked) == 52)
    added = [e["request_id"] for e in h.inbox("mallory") if e["type"] == "message-added"]
    assert [r for r in added if (r or "").startswith("m")] == ["m0", "m1", "m2", "m3"]
    await h.stop()


@run
async def test_refusals_on_arrival_wait_while_the_publish_window_is_full() -> None:
    """Backpressure holds for refusals too: while the broker takes no events, commands over the limit
    stay unacknowledged (their answers would pile up in the bridge), and are answered afterwards."""
    transport = FakeTransport(auto_complete=False)
    loop_probes(transport)
    h = await Harness(transport=transport, publish_window=3, limiter=RateLimiter(0.01, 1)).start()
    h.transport.complete()  # status and probe
    await until(lambda: h.pipeline.status.probes_returned == 1)
    h.send("alice", "connect", session_id="a1", request_id="c")  # three events: the window is full
    await until(lambda: len(h.transport.acked) == 1)
    for i in range(5):
        h.send("alice", "get-active-users", request_id=f"g{i}")
    await asyncio.sleep(0.02)
    assert len(h.transport.acked) == 1
    while len(h.transport.acked) < 6:
        h.transport.complete()
        await asyncio.sleep(0.001)
    await until(lambda: len(h.answers("alice")) == 6)
    h.transport.complete()
    assert h.answers("alice") == ["c", *(f"g{i}" for i in range(5))]
    await h.stop()
