"""The bridge's events straight to the embedded broker's sessions subscribed to their topic.

amqtt routes a publish through its broadcast queue: a task per event that scans every subscription
filter and awaits the topic rules for each subscriber, then a task per subscriber that sends the
PUBLISH and waits for its PUBACK under a 5 s timeout, after which the event is dropped (a slow but
connected client lost it) and, for a session that was offline, a queue replayed on reconnect with
one more such task per message. `Fanout` does the same job for the events of the bridge in this
process, synchronously and with amqtt's own session objects:

- **Who gets an event**: the sessions of amqtt's subscriptions (`Broker._subscriptions`, kept by
  amqtt on subscribe, unsubscribe and disconnect) whose filter is the topic itself (a dictionary
  lookup) or a wildcard filter that matches it (the wildcard filters that match a topic are cached
  until a new wildcard filter appears), each session once (at the highest QoS of its matching
  filters), and only if the topic rules let its user read the topic (`Topics.allows(...,
  "receive")`, cached per user and topic: the rules depend on nothing else).
- **QoS**: the publish's QoS (the bridge's events are QoS 1, typing QoS 0) capped by the
  subscription's, as MQTT says (amqtt delivered at the subscription's QoS, QoS 2 included).
- **Per session, an `Outbox`**: the events sent and not acknowledged (in `session.inflight_out`, so
  amqtt never reuses their packet ids), at most `window` of them, and behind them the events still
  to send, in order. A PUBACK sends the next. Nothing expires: an event stays until its PUBACK.
  When the connection ends, a persistent session keeps both (the sent ones go again, flagged DUP,
  then the rest, in order, when it reconnects); a clean session ends with them (the client catches
  up from the bridge's history).
- **Bounds**: a connected session may hold `max_queued` events (sent and waiting); one more closes
  its connection (its will fires), since a client that does not acknowledge would otherwise grow
  the broker's memory without end. A disconnected persistent session queues at most `offline_queue`
  (more are dropped and logged until it reconnects). The bridge's own account is not capped.
- **Writes**: over TCP a PUBLISH is written to the socket at once (every writer of amqtt writes a
  whole packet in one call); over WebSockets, where amqtt's writer sends what it buffered only when
  drained, under the connection's write lock from one task per burst.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.session import OutgoingApplicationMessage

from .limits import OncePer
from .mqtt_codec import encode_publish, topic_bytes
from .topics import BRIDGE_ACCOUNT, Topics

log = logging.getLogger(__name__)

WINDOW = 64  # events sent to one connection and not acknowledged yet; the rest wait in order
# Events one connected session may hold (sent and waiting); one more closes its connection. Above the
# offline queue's cap, so that a session back with a full queue has time to take it.
MAX_QUEUED = 2000
_CACHE = 8192  # topics (and user, topic pairs) remembered before the caches start again
_LOG_LIMIT = OncePer(60_000)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class Delivery(OutgoingApplicationMessage):  # type: ignore[misc]
    """One event for one session (amqtt's outgoing message, so amqtt's packet ids avoid it)."""

    __slots__ = ("topic_raw",)

    def __init__(self, topic: str, topic_raw: bytes, data: bytes, qos: int) -> None:
        super().__init__(None, topic, qos, data, False)
        self.topic_raw = topic_raw


class Outbox:
    """A session's events: sent and not acknowledged (`inflight`, by packet id, in the order sent),
    and waiting to be sent (`waiting`). `handler` is the connection they go to (None: none ready)."""

    __slots__ = ("handler", "inflight", "session", "waiting")

    def __init__(self, session: Any) -> None:
        self.session = session
        self.handler: Any = None
        self.inflight: OrderedDict[int, Delivery] = OrderedDict()
        self.waiting: deque[Delivery] = deque()

    def __len__(self) -> int:
        return len(self.inflight) + len(self.waiting)

    def attach(self, handler: Any, window: int) -> None:
        """A connection is ready for PUBLISHes (after its CONNACK): what was sent and not acknowledged
        goes again (DUP), in order, then what waited."""
        self.handler = handler
        for delivery in self.inflight.values():
            _emit(handler, _encode(delivery, dup=True))
        self.fill(window)

    def detach(self, handler: Any) -> None:
        if self.handler is handler:
            self.handler = None

    def fill(self, window: int) -> None:
        handler = self.handler
        if handler is None:
            return
        inflight, waiting, session = self.inflight, self.waiting, self.session
        while waiting and len(inflight) < window:
            delivery = waiting.popleft()
            delivery.packet_id = packet_id = session.next_packet_id
            inflight[packet_id] = delivery
            session.inflight_out[packet_id] = delivery
            _emit(handler, _encode(delivery))

    def acked(self, packet_id: int, window: int) -> bool:
        """A PUBACK: whether it was for one of these events (then the next goes)."""
        delivery = self.inflight.pop(packet_id, None)
        if delivery is None:
            return False
        self.session.inflight_out.pop(packet_id, None)
        if self.waiting:
            self.fill(window)
        return True


def _encode(delivery: Delivery, dup: bool = False) -> bytes:
    packet_id = delivery.packet_id or 0
    return encode_publish(delivery.topic_raw, delivery.data, delivery.qos or 0, False, packet_id, dup)


def outbox_of(session: Any) -> Outbox:
    out: Outbox | None = session.__dict__.get("_bridge_out")
    if out is None:
        out = session._bridge_out = Outbox(session)
    return out


def queued(session: Any) -> int:
    """The events a session holds (sent and not acknowledged, and waiting)."""
    out: Outbox | None = session.__dict__.get("_bridge_out")
    return len(out) if out is not None else 0


def _emit(handler: Any, data: bytes) -> None:
    """Writes one packet to a connection (see the module docstring); a closed one writes nothing."""
    writer = handler.writer
    if writer is None:
        return
    if isinstance(writer, StreamWriterAdapter):
        transport = writer._writer.transport
        if not writer.is_closed and not transport.is_closing():
            transport.write(data)
        return
    handler.emit_locked(data)  # WebSockets: buffered, drained under the write lock


def wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT's filter match (a `$` topic is not matched by a filter starting with a wildcard)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return i == len(levels) - 1
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(levels) == len(parts)


class Fanout:
    """Delivers the bridge's events to the sessions of `broker` (an `EmbeddedBroker`); see the module
    docstring. Runs on the broker's event loop."""

    def __init__(
        self,
        broker: Any,
        topics: Topics,
        *,
        offline_queue: int,
        max_queued: int = MAX_QUEUED,
        window: int = WINDOW,
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.offline_queue = offline_queue
        self.max_queued = max_queued
        self.window = window
        self._wildcards: dict[str, None] = {}  # wildcard filters seen, in order
        self._matching: dict[str, tuple[str, ...]] = {}  # topic -> the wildcard filters matching it
        self._readable: dict[tuple[str | None, str], bool] = {}
        self.dropped = 0  # events dropped at a full offline queue
        self.disconnected = 0  # connections closed at max_queued

    # --- the subscription index ---------------------------------------------------------

    def subscribed(self, topic_filter: str) -> None:
        """amqtt added a subscription to `topic_filter` (called after it did)."""
        if wildcard(topic_filter) and topic_filter not in self._wildcards:
            subscriptions = self.broker._subscriptions
            self._wildcards = {f: None for f in self._wildcards if subscriptions.get(f)}
            self._wildcards[topic_filter] = None
            self._matching.clear()

    def targets(self, topic: str) -> list[tuple[Any, int]]:
        """The sessions subscribed to `topic`, each once with its highest QoS of the filters matching
        (amqtt's sessions compare by client id and cannot be hashed: kept by identity)."""
        subscriptions = self.broker._subscriptions
        exact = subscriptions.get(topic)
        filters = self._matching.get(topic)
        if filters is None:
            if len(self._matching) >= _CACHE:
                self._matching.clear()
            filters = self._matching[topic] = tuple(f for f in self._wildcards if matches(topic, f))
        if not filters:
            return list(exact) if exact else []
        found: dict[int, tuple[Any, int]] = {}
        for subscribed in (exact or (), *(subscriptions.get(f, ()) for f in filters)):
            for session, qos in subscribed:
                seen = found.get(id(session))
                if seen is None or seen[1] < qos:
                    found[id(session)] = (session, qos)
        return list(found.values())

    def readable(self, username: str | None, topic: str) -> bool:
        key = (username, topic)
        allowed = self._readable.get(key)
        if allowed is None:
            if len(self._readable) >= _CACHE:
                self._readable.clear()
            allowed = self._readable[key] = self.topics.allows(username, topic, "receive")
        return allowed

    # --- delivery -----------------------------------------------------------------------

    def publish(self, topic: str, data: bytes, qos: int = 1) -> None:
        """Hands an event to every session that may read it (see the module docstring)."""
        raw = topic_bytes(topic)
        for session, sub_qos in self.targets(topic):
            if not self.readable(session.username or None, topic):
                continue
            q = min(qos, sub_qos, 1)
            connected = session.transitions.state == "connected"
            if q == 0:
                if connected:
                    out = session.__dict__.get("_bridge_out")
                    handler = out.handler if out is not None else None
                    if handler is not None:
                        _emit(handler, encode_publish(raw, data, 0))
                continue
            out = outbox_of(session)
            capped = session.username != BRIDGE_ACCOUNT
            if connected and out.handler is not None:
                if not capped or len(out) < self.max_queued:
                    out.waiting.append(Delivery(topic, raw, data, q))
                    if len(out.inflight) < self.window:
                        out.fill(self.window)
                    continue
                self._overflow(session)
            # no connection ready: kept for the session (one connecting, or persistent) up to a cap
            if not connected and session.clean_session:
                continue  # the session ends: its client catches up from the history
            if capped and len(out) >= self.offline_queue:
                self.dropped += 1
                if _LOG_LIMIT.due(f"queue {session.client_id}", _now_ms()):
                    log.warning(
                        "offline queue of %s is full (%d): dropping what more comes until it reconnects",
                        session.client_id,
                        self.offline_queue,
                    )
                continue
            out.waiting.append(Delivery(topic, raw, data, q))

    def _overflow(self, session: Any) -> None:
        """A connected client holds `max_queued` events it has not acknowledged: its connection is
        closed (as if it dropped; its will fires), and what more comes is kept as for an offline
        session."""
        out = outbox_of(session)
        handler = out.handler
        out.detach(handler)
        self.disconnected += 1
        if _LOG_LIMIT.due(f"overflow {session.client_id}", _now_ms()):
            log.warning(
                "closing %s: %d events not acknowledged (a persistent session keeps them for its next "
                "connection)",
                session.client_id,
                self.max_queued,
            )
        from .broker import _abort  # (broker imports this module)

        _abort(handler.writer)

    def pending(self) -> int:
        """Events that connected sessions have not acknowledged yet (for a graceful shutdown)."""
        total = 0
        for session, _handler in list(self.broker._sessions.values()):
            if session.transitions.state == "connected":
                total += queued(session)
        return total


async def write_locked(handler: Any) -> None:
    """Writes a WebSocket connection's buffered packets under its write lock (one task per burst)."""
    try:
        while handler._emitted and handler.writer is not None:
            packets, handler._emitted = handler._emitted, []
            async with handler._write_lock:
                handler.writer.write(b"".join(packets))
                await handler.writer.drain()
    except Exception as exc:  # the connection is gone: a persistent session sends them again
        log.debug("packets not written: %s", exc)
    finally:
        handler._emitted.clear()
        handler._emitting = False


def schedule_write(handler: Any, data: bytes) -> None:
    handler._emitted.append(data)
    if not handler._emitting:
        handler._emitting = True
        asyncio.get_running_loop().create_task(write_locked(handler))
