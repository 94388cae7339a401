"""The bridge's one pipeline: batch, admit, apply, publish, acknowledge, forget.

Independent of the transport (bridge/transport.py). The concurrency model is one
asyncio event loop for all I/O and bookkeeping, plus one database thread:

- the transport calls `received()` on the loop; a command over its sender's rate
  limit is answered `rate-limited` and acknowledged there and then (no storage,
  no turn of the pipeline; while the publish window is full it waits like the
  others); the rest wait in one queue per user;
- one task takes them in batches, a command of each waiting user in turn (so a
  user with thousands waiting delays another's next command by at most one
  batch, and each user's commands keep their order), refuses those of users in
  debt of their cost budget, and applies the rest with `Service.handle_batch`
  on the database thread (one transaction, which also stores the events in the
  outbox and forgets the batches the broker has acknowledged since);
- after the commit it hands the events to the transport and acknowledges the
  commands; each event's completion counts down its batch, and a batch whose
  every event the broker took is forgotten at the next commit (or when idle).

Nothing else runs concurrently with the database thread's work, so the
service and the store need no locks; the loop never blocks on the database.

While `publish_window` events await the broker, no new batch starts: commands
stay unacknowledged at the broker, whose in-flight limit then stops sending.
An event lost with the connection is published again after the reconnect (same
bytes, same event id); one the broker refuses, or one that keeps costing the
connection (the broker disconnects whenever it is the oldest one in flight,
`poison_after` times), is set aside, logged and counted, and the rest flows.

A probe published to the bridge's own command topic after each (re)connect
marks the end of the broker's queued backlog (commands before it are
`Inbound.queued`); probes sent periodically afterwards tell whether the broker
still delivers the subscription: when one does not come back, the pipeline
subscribes again, then reconnects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import orjson

from . import core
from . import protocol as p
from .limits import OncePer
from .metrics import Health
from .model import OutboxEntry, StorageUnavailable
from .service import Batch, Inbound, Service, encode
from .topics import BRIDGE_ACCOUNT, PROBE_COMMAND
from .transport import Command, Disconnected, Event, EventRefused, Transport

T = TypeVar("T")

log = logging.getLogger(__name__)

BRIDGE_USER = BRIDGE_ACCOUNT  # the reserved user id whose command topic carries the probes
PROBE = PROBE_COMMAND
MIN_PACKET_LIMIT = 1024  # no broker is configured to take less; a smaller poison was not about size
# For tests only: seconds the database thread waits before applying each batch of commands, a window
# in which commands are in the bridge's hands and not committed (tests kill the process there).
HOLD_BEFORE_APPLY = "CHAT_BRIDGE_TEST_HOLD_BEFORE_APPLY"


class Topics(Protocol):
    """What the pipeline needs to know of the topic layout."""

    @property
    def status(self) -> str: ...

    def parse_command(self, topic: str) -> tuple[str, str] | None: ...

    def of(self, kind: str, key: str) -> str: ...

    def command(self, user_id: str, name: str) -> str: ...


@dataclass
class RuntimeStatus:
    """What the runtime knows about itself, for /healthz, /metrics and tests."""

    connected: bool = False
    broker_error: str | None = "not connected yet"
    online: bool = False  # announced `online` at least once
    connects: int = 0
    commands: int = 0  # commands applied or answered
    queued_commands: int = 0  # of which delivered from the broker's backlog
    events_published: int = 0
    events_set_aside: int = 0
    ignored_messages: int = 0  # retained commands, bad topics
    probes_returned: int = 0
    probes_lost: int = 0
    resubscribes: int = 0
    forced_reconnects: int = 0
    storage_retries: int = 0
    backlog: int = 0  # events committed and not yet taken by the broker
    set_aside: list[str] = field(default_factory=list)  # event ids, the latest 100


class _Abandoned(Exception):
    """The pipeline stops while storage is down; what is in hand stays unacknowledged."""


@dataclass(slots=True, eq=False)
class _Flight:
    """One committed batch's events on their way to the broker."""

    batch_id: str
    remaining: int


@dataclass(slots=True, eq=False)
class _Item:
    seq: int
    event: Event
    flight: _Flight
    strikes: int = 0
    sent_at: float = 0.0


def _size(event: Event) -> int:
    """About the size of the event's PUBLISH packet (what a broker's max_packet_size limits)."""
    return len(event.payload) + len(event.topic) + 8


def _event_id(payload: bytes) -> str:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "?"
    return str(obj.get("event_id", "?")) if isinstance(obj, dict) else "?"


class Pipeline:
    """Runs the service against a transport until `stop()`."""

    def __init__(
        self,
        service: Service,
        transport: Transport,
        topics: Topics,
        *,
        batch_max: int = 256,
        publish_window: int = 10_000,
        session_grace: float = 30.0,
        is_transient: Callable[[BaseException], bool] = lambda exc: False,
        probe_interval: float = 15.0,
        probe_timeout: float = 5.0,
        poison_after: int = 3,
        strike_window: float = 2.0,
        stop_timeout: float = 5.0,
        retry_delays: tuple[float, float] = (0.5, 5.0),
        status: RuntimeStatus | None = None,
        health: Health | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if publish_window < 1:
            raise ValueError("publish_window must be at least 1")
        self.service = service
        self.transport = transport
        self.topics = topics
        self.batch_max = batch_max
        self.publish_window = publish_window
        self.session_grace = session_grace
        self.is_transient = is_transient
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.poison_after = poison_after
        self.strike_window = strike_window
        self.stop_timeout = stop_timeout
        self.retry_delays = retry_delays
        self.status = status or RuntimeStatus()
        self.metrics = service.metrics
        self.health = health
        self.clock = clock
        self.probe_topic = topics.command(BRIDGE_USER, PROBE)
        self._since = p.iso_ms(service.clock())
        # per user, in arrival order; with each command whether its rate limit was checked on arrival
        self._queues: dict[str, deque[tuple[Command, Inbound, bool]]] = {}
        self._turns: deque[str] = deque()  # the users with commands waiting, in the order of their turns
        self._waiting = 0  # commands in the queues
        self._jobs: deque[Callable[[], Batch]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set while the publish window has room
        self._room.set()
        self._stopping = asyncio.Event()
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bridge-db")
        self._connected = False
        self._unsent: deque[_Item] = deque()
        self._failed: list[_Item] = []  # lost with a connection, to go again after the reconnect
        self._dropped_at = 0.0
        self._strike_due = False
        self._seq = 0
        self._backlog = 0  # events not yet taken by the broker
        self._acknowledged: list[str] = []  # batches fully taken, to forget at the next commit
        self._in_hand = 0  # commands received and not yet acknowledged
        self._backlog_open = True  # commands before the probe returns come from the broker's queue
        self._probe: str | None = None  # the nonce of the probe in flight
        self._probe_since = 0.0
        self._probe_failures = 0
        self._grace: asyncio.TimerHandle | None = None
        self._announced = 0  # the connection (by count) announced last
        self._too_large: int | None = None  # the smallest event the broker kept disconnecting on
        self._ignored_warning = OncePer(60_000)
        self._hold = float(os.environ.get(HOLD_BEFORE_APPLY) or 0)
        self.ready = asyncio.Event()  # online: connected, subscribed, announced

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Works until `stop()`; then finishes the batch in hand, waits briefly for the broker to take
        the events in flight, forgets them in the outbox, announces `offline` and disconnects."""
        self.transport.start(self)
        prober = asyncio.create_task(self._probe_loop())
        try:
            await self._recover()
            while not self._stopping.is_set():
                await self._step()
        except _Abandoned:
            log.warning("stopped with uncommitted commands in hand; the broker will redeliver them")
        finally:
            prober.cancel()
            if self._grace:
                self._grace.cancel()
            await self._drain()
            offline = {
                "status": "offline",
                "epoch": self.service.epoch,
                "since": p.iso_ms(self.service.clock()),
            }
            await self.transport.close(Event(self.topics.status, orjson.dumps(offline), retain=True))
            self._db.shutdown(wait=True)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._room.set()

    async def _drain(self) -> None:
        """On a graceful stop: lets the broker take what is in flight, then forgets it in the outbox,
        so that nothing acknowledged is published again by the next start."""
        deadline = self.clock() + self.stop_timeout
        while self._backlog and self._connected and self.clock() < deadline:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=0.05)
        done, self._acknowledged = self._acknowledged, []
        if done:
            try:
                await asyncio.get_running_loop().run_in_executor(self._db, self.service.forget, done)
            except Exception as exc:
                log.warning("could not forget %d published batch(es) before stopping: %s", len(done), exc)

    # --- the transport's listener ------------------------------------------------

    def connected(self) -> None:
        self._connected = True
        self.status.connected, self.status.broker_error = True, None
        self.status.connects += 1
        if self.health is not None:
            self.health.broker_up()
        log.info("connected to the broker")
        # after the failures of the lost connection, which are already scheduled
        asyncio.get_running_loop().call_soon(self._resume)

    def disconnected(self, error: str) -> None:
        was = self._connected
        self._connected = False
        self.status.connected, self.status.broker_error = False, error
        if self.health is not None:
            self.health.broker_down(error)
        if was:
            self._dropped_at = self.clock()
            self._strike_due = True
        if self._stopping.is_set():
            return
        if was or self._ignored_warning.due(f"broker:{error}", int(self.clock() * 1000)):
            log.warning("broker unavailable: %s; retrying", error)

    def received(self, commands: Sequence[Command]) -> None:
        refused: list[tuple[Command, list[core.Delivery]]] = []
        room = self._backlog < self.publish_window
        for cmd in commands:
            parsed = self.topics.parse_command(cmd.topic)
            if cmd.retain:
                # A retained command would be replayed at every subscription: never apply one.
                self._ignore(cmd, "retained-command", "commands must not be retained")
                continue
            if parsed is None:
                self._ignore(cmd, "bad-topic", "not a command topic with a valid user id")
                continue
            user, name = parsed
            if user == BRIDGE_USER:
                if name == PROBE:
                    self._probe_returned(cmd.payload)
                    cmd.ack()
                else:
                    self._ignore(cmd, "bridge-topic", f"{BRIDGE_USER} is the bridge's own account")
                continue
            self._in_hand += 1
            inbound = Inbound(user, name, cmd.payload, queued=self._backlog_open)
            if room:
                answers = self.service.refusal(inbound)
                if answers is not None:
                    refused.append((cmd, answers))
                    continue
            self._queue(cmd, inbound, room)
        self._probe_since = max(self._probe_since, self.clock())  # the subscription delivers
        if refused:
            self._refuse(refused)
        self._wake.set()

    def _queue(self, cmd: Command, inbound: Inbound, checked: bool) -> None:
        queue = self._queues.get(inbound.user_id)
        if queue is None:
            queue = self._queues[inbound.user_id] = deque()
            self._turns.append(inbound.user_id)
        queue.append((cmd, inbound, checked))
        self._waiting += 1

    def _take(self, count: int) -> list[tuple[Command, Inbound, bool]]:
        """Up to `count` waiting commands: one of each waiting user in turn, each user's in order."""
        taken: list[tuple[Command, Inbound, bool]] = []
        queues, turns = self._queues, self._turns
        while turns and len(taken) < count:
            user = turns.popleft()
            queue = queues[user]
            taken.append(queue.popleft())
            if queue:
                turns.append(user)
            else:
                del queues[user]
        self._waiting -= len(taken)
        return taken

    def _refuse(self, refused: list[tuple[Command, list[core.Delivery]]]) -> None:
        answers = [answer for _, some in refused for answer in some]
        self._ack([cmd for cmd, _ in refused], [])
        if answers:
            self._send(Batch("", answers, encode(answers, "")))

    def _ignore(self, cmd: Command, kind: str, why: str) -> None:
        self.status.ignored_messages += 1
        self.metrics.dropped.labels(kind).inc()
        if self._ignored_warning.due(kind, int(self.clock() * 1000)):
            log.warning(
                "ignored a message on %r: %s (%d ignored so far; at most one such warning a minute)",
                cmd.topic,
                why,
                self.status.ignored_messages,
            )
        cmd.ack()

    # --- the probe -----------------------------------------------------------------

    def _send_probe(self) -> None:
        self._probe = secrets.token_hex(8)
        self._probe_since = self.clock()
        self._fire(Event(self.probe_topic, self._probe.encode()))

    def _probe_returned(self, payload: bytes) -> None:
        if self._probe is None or payload.decode(errors="replace") != self._probe:
            return  # an earlier probe, or not ours
        self._probe = None
        self._probe_failures = 0
        self.status.probes_returned += 1
        if self._backlog_open:
            self._backlog_open = False
            log.debug("the broker's queued backlog is delivered")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.probe_interval, self.probe_timeout) / 4)
            if not self._connected or self._stopping.is_set():
                continue
            now = self.clock()
            if self._probe is None:
                if now - self._probe_since >= self.probe_interval:
                    self._send_probe()
                continue
            if self._in_hand or self._backlog >= self.publish_window:
                self._probe_since = now  # busy: the broker waits for our acknowledgements
                continue
            if now - self._probe_since < self.probe_timeout * (1 + min(self._probe_failures, 4) * 2):
                continue
            self._probe_lost()

    def _probe_lost(self) -> None:
        self.status.probes_lost += 1
        self._probe_failures += 1
        self._backlog_open = False  # whatever comes now is not the backlog we waited for
        if self._probe_failures == 1:
            self.status.resubscribes += 1
            log.warning(
                "the bridge's probe on %s did not come back within %.0fs: the broker may have dropped "
                "its subscription; subscribing again",
                self.probe_topic,
                self.probe_timeout,
            )
            self.transport.resubscribe()
        else:
            self.status.forced_reconnects += 1
            log.error(
                "the bridge's probe on %s still does not come back (%d times): reconnecting; check "
                "that the broker lets the bridge's account publish there and read its command topics",
                self.probe_topic,
                self._probe_failures,
            )
            self.transport.reconnect()
        self._send_probe()

    # --- the worker task ---------------------------------------------------------

    async def _step(self) -> None:
        if not self._waiting and not self._jobs:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                await self._forget_published()  # idle: tidy the outbox
            return
        await self._wait_for_room()
        if self._stopping.is_set():
            return
        if self._jobs:
            self._send(await self._retrying(self._jobs.popleft()))
            return
        admitted: list[tuple[Command, Inbound]] = []
        refused: list[tuple[Command, list[core.Delivery]]] = []
        for cmd, inbound, checked in self._take(self.batch_max):
            # the rate limit was checked on arrival, unless the publish window was full then; the cost
            # budget again now: the user's commands before this one have been charged meanwhile
            answers = self.service.over_cost(inbound) if checked else self.service.refusal(inbound)
            if answers is None:
                admitted.append((cmd, inbound))
            else:
                refused.append((cmd, answers))
        if admitted:
            items = [inbound for _, inbound in admitted]
            published, self._acknowledged = self._acknowledged, []
            apply = partial(self.service.handle_batch, items, published, admitted=True)
            if self._hold:
                apply = partial(self._held, apply, len(items))
            try:
                batch = await self._retrying(apply, partial(self.service.internal_errors, items))
            except _Abandoned:
                self._acknowledged.extend(published)
                raise
            # acknowledged first: the events are in the outbox already, and a broker that closes the
            # connection on one of them must not also lose the acknowledgement (and apply it again)
            self._ack([cmd for cmd, _ in admitted], items)
            self._send(batch)
        if refused:
            # after the admitted commands: a flooder's refusals never delay the others' answers
            self._refuse(refused)

    def _held(self, apply: Callable[[], Batch], count: int) -> Batch:
        """On the database thread, tests only: waits `HOLD_BEFORE_APPLY` seconds, then applies."""
        log.warning("test hold: %d command(s) wait %gs before they are applied", count, self._hold)
        time.sleep(self._hold)
        return apply()

    def _ack(self, commands: list[Command], inbound: list[Inbound]) -> None:
        for cmd in commands:
            cmd.ack()
        self._in_hand -= len(commands)
        self.status.commands += len(commands)
        self.status.queued_commands += sum(1 for i in inbound if i.queued)

    async def _wait_for_room(self) -> None:
        while self._backlog >= self.publish_window and not self._stopping.is_set():
            self._room.clear()
            await self._room.wait()

    async def _recover(self) -> None:
        """Publishes what an earlier run committed but may not have published (same bytes, same event ids)."""
        pending = await self._retrying(self.service.pending)
        if pending:
            log.info("publishing %d event(s) left in the outbox by the previous run", len(pending))
        by_batch: dict[str, list[OutboxEntry]] = {}
        for entry in pending:
            by_batch.setdefault(entry.batch, []).append(entry)
        for batch_id, entries in by_batch.items():
            self._send(Batch(batch_id, [], entries))

    async def _forget_published(self) -> None:
        done, self._acknowledged = self._acknowledged, []
        if done:
            try:
                await self._retrying(partial(self.service.forget, done))
            except _Abandoned:
                self._acknowledged.extend(done)

    async def _retrying(self, job: Callable[[], T], fallback: Callable[[], T] | None = None) -> T:
        """Runs the job on the database thread until it commits; while storage is down nothing is
        acknowledged. A failure that is not an outage is retried a few times, then answered by `fallback`."""
        loop = asyncio.get_running_loop()
        delay, failures, outage_since, reconnected = self.retry_delays[0], 0, 0.0, False
        while True:
            try:
                result = await loop.run_in_executor(self._db, job)
                if outage_since:
                    log.info("storage is back after %.1fs; carrying on", self.clock() - outage_since)
                return result
            except Exception as exc:
                self.status.storage_retries += 1
                self.metrics.database_retries.inc()
                if isinstance(exc, StorageUnavailable) and exc.connection_lost and not reconnected:
                    # A pooled connection the server had closed (a restart, an idle timeout): connections
                    # are not pinged before use, so try a fresh one at once before calling it an outage.
                    reconnected = True
                    log.info("the database connection was lost (%s); reconnecting", type(exc).__name__)
                    continue
                if self.is_transient(exc):
                    outage_since = outage_since or self.clock()
                    log.warning(
                        "storage unavailable (%s); retrying in %.1fs, commands stay unacknowledged",
                        type(exc).__name__,
                        delay,
                    )
                else:
                    failures += 1
                    log.error("a batch failed to commit (attempt %d)", failures, exc_info=exc)
                    if failures >= 3 and fallback is not None:
                        return fallback()
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                    raise _Abandoned  # stopping mid-outage: leave the commands unacknowledged
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.retry_delays[1])

    # --- publishing --------------------------------------------------------------

    def _send(self, batch: Batch) -> None:
        if batch.ephemeral and self._connected:
            for e in batch.ephemeral:  # QoS 0, never stored: sent once if connected, never tracked
                self._fire(Event(self.topics.of(e.kind, e.key), e.payload, qos=0))
        if not batch.entries:
            return
        flight = _Flight(batch.id, len(batch.entries))
        for e in batch.entries:
            self._seq += 1
            self._unsent.append(
                _Item(self._seq, Event(self.topics.of(e.kind, e.key), e.payload, e.retain), flight)
            )
        self._backlog += len(batch.entries)
        counts: dict[str, int] = {}
        for e in batch.entries:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        for kind, n in counts.items():
            self.metrics.events_published.labels(kind).inc(n)
        self.status.backlog = self._backlog
        if self._connected:
            self._flush()

    def _flush(self) -> None:
        """Hands every unsent event to the transport, oldest first."""
        publish, done, now = self.transport.publish, self._done, self.clock()
        publish_then = getattr(self.transport, "publish_then", None)  # no future per event
        outcome = self._outcome
        while self._unsent and self._connected:
            item = self._unsent.popleft()
            if self._too_large is not None and _size(item.event) >= self._too_large:
                self._set_aside(
                    item, f"at least as large as one the broker would not take ({self._too_large} bytes)"
                )
                continue
            item.sent_at = now
            if publish_then is not None:
                publish_then(item.event, partial(outcome, item))
            else:
                publish(item.event).add_done_callback(partial(done, item))

    def _done(self, item: _Item, future: asyncio.Future[None]) -> None:
        self._outcome(item, future.exception())

    def _outcome(self, item: _Item, exc: BaseException | None) -> None:
        if exc is None:
            self.status.events_published += 1
            self._taken(item)
        elif isinstance(exc, EventRefused):
            self._set_aside(item, str(exc) or "refused by the broker")
        elif isinstance(exc, Disconnected):
            self._failed.append(item)
            if self._connected:  # failed after the reconnect was already handled
                asyncio.get_running_loop().call_soon(self._resume)
        else:
            log.error("the transport failed an event unexpectedly; it goes again", exc_info=exc)
            self._failed.append(item)

    def _taken(self, item: _Item) -> None:
        self._backlog -= 1
        self.status.backlog = self._backlog
        flight = item.flight
        flight.remaining -= 1
        if not flight.remaining and flight.batch_id:
            self._acknowledged.append(flight.batch_id)
        if self._backlog < self.publish_window:
            self._room.set()

    def _set_aside(self, item: _Item, why: str) -> None:
        event_id = _event_id(item.event.payload)
        self.status.events_set_aside += 1
        self.metrics.dropped.labels("poison-event").inc()
        self.status.set_aside = [*self.status.set_aside[-99:], event_id]
        log.error(
            "set aside event %s (%d bytes on %s): %s; it stays stored, the rest flows",
            event_id,
            len(item.event.payload),
            item.event.topic,
            why,
        )
        self._taken(item)

    def _resume(self) -> None:
        """After a (re)connect: the events lost with the connection go first, in their order; the one
        that was oldest when the broker dropped us gets a strike, and is set aside after `poison_after`."""
        if not self._connected:
            return
        if self._failed:
            failed = sorted(self._failed, key=lambda item: item.seq)
            self._failed = []
            if self._strike_due:
                oldest = failed[0]
                if self._dropped_at - oldest.sent_at <= self.strike_window:
                    oldest.strikes += 1
                if oldest.strikes >= self.poison_after:
                    failed.pop(0)
                    size = _size(oldest.event)
                    if size >= MIN_PACKET_LIMIT:  # small ones were not refused for their size
                        self._too_large = size if self._too_large is None else min(self._too_large, size)
                    self._set_aside(
                        oldest,
                        f"the broker closed the connection {oldest.strikes} times while it was the oldest "
                        "event in flight (larger than the broker's max_packet_size?)",
                    )
            self._unsent.extendleft(reversed(failed))
        self._strike_due = False
        if self.status.connects != self._announced:
            self._announce()
        self._flush()

    def _announce(self) -> None:
        """Once per (re)connect: probe for the end of the broker's queued backlog, announce `online`."""
        self._announced = self.status.connects
        self._backlog_open = True
        self._probe_failures = 0
        self._send_probe()
        status = p.BridgeStatus(status="online", epoch=self.service.epoch, since=self._since)
        self._fire(Event(self.topics.status, status.model_dump_json().encode(), retain=True))
        if not self.ready.is_set():
            self.ready.set()
            self.status.online = True
            self._grace = asyncio.get_running_loop().call_later(self.session_grace, self._expire_sessions)
            log.info("bridge online (epoch %s)", self.service.epoch)

    def _expire_sessions(self) -> None:
        self._jobs.append(self.service.expire_sessions)
        self._wake.set()

    def _fire(self, event: Event) -> None:
        """A publish whose outcome nobody waits for (status, probes)."""
        self.transport.publish(event).add_done_callback(_swallow)


def _swallow(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
