"""The seam between the bridge's pipeline and whatever carries its messages.

A transport delivers commands in, each with an acknowledgement handle, and
takes events out, each with a completion. The pipeline (bridge/pipeline.py)
only ever talks to this interface; adapters exist for MQTT clients, the
embedded broker, and `FakeTransport` below for unit tests.

The meaning every adapter keeps:

- `Command.ack()` is called once the command's effects are committed (or once
  the pipeline decided the command needs no work). Until then the broker keeps
  it: a command never acknowledged is redelivered after a reconnect or restart.
- `Transport.publish(event)` returns a future that completes when the broker
  has taken the event (a PUBACK, or the embedded broker's queue). It fails with
  `Disconnected` when the connection was lost first: the transport does not
  send it again by itself, the pipeline decides (it republishes, and sets an
  event aside that keeps costing the connection). It fails with
  `EventRefused` when the event can never be delivered (too large for the
  broker, refused by it): the pipeline sets it aside at once.
- A transport may also offer `publish_then(event, done)`, the same without a
  future: `done(None)` when the broker took the event, `done(error)` (on a
  later loop iteration) when not; the pipeline uses it where it exists.
- The transport connects, reconnects with backoff and subscribes to the
  command filter by itself; it reports each (re)connection and each loss to
  its `Listener`, on the event loop's thread.
- Everything is called on one asyncio event loop; callbacks to the listener
  run on that loop too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class TransportError(Exception):
    """Why an event did not reach the broker."""


class Disconnected(TransportError):
    """The connection was lost before the broker acknowledged the event; it may go again."""


class EventRefused(TransportError):
    """The event can never be delivered as it is (too large, refused by the broker)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One publish: QoS 1, retained or not; QoS 0 for ephemeral events (typing), whose completion
    means only that it was sent."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclass(slots=True)
class Command:
    """One message from the command subscription, and how to acknowledge it."""

    topic: str
    payload: bytes
    retain: bool = False
    ack: Callable[[], object] = field(default=lambda: None, repr=False)


class Listener(Protocol):
    """What a transport tells the pipeline, always on the event loop."""

    def connected(self) -> None:
        """Connected and subscribed to the command filter (again)."""

    def disconnected(self, error: str) -> None:
        """The connection is lost or could not be made; the transport keeps retrying."""

    def received(self, commands: Sequence[Command]) -> None:
        """Commands arrived, in the broker's order."""


class Transport(Protocol):
    def start(self, listener: Listener) -> None:
        """Starts connecting (and keeps doing so) on the running event loop."""

    def publish(self, event: Event) -> asyncio.Future[None]:
        """Hands one event to the broker; see the module docstring for what the future means."""

    def resubscribe(self) -> None:
        """Subscribes to the command filter again (the broker may have dropped the subscription)."""

    def reconnect(self) -> None:
        """Drops the connection and makes a new one."""

    async def close(self, farewell: Event | None = None) -> None:
        """Publishes `farewell` if connected (waiting briefly for it), then disconnects for good;
        the last will is not published."""


class FakeTransport:
    """An in-memory transport for unit tests: the test plays the broker.

    `deliver()` hands commands to the pipeline; `published` lists every event the pipeline
    handed over, with its future, which the test completes (`complete()`, `refuse()`,
    `drop_connection()`) or leaves pending. `auto_complete` acknowledges each publish at once.
    """

    def __init__(self, *, auto_complete: bool = True, refuse: Callable[[Event], bool] | None = None) -> None:
        self.auto_complete = auto_complete
        self.refuse_if = refuse  # a broker that refuses some events outright
        self.listener: Listener | None = None
        self.is_connected = False
        self.published: list[tuple[Event, asyncio.Future[None]]] = []
        self.acked: list[str] = []  # payloads of acknowledged commands, in order
        self.resubscribes = 0
        self.reconnects = 0
        self.closed = False
        self.farewell: Event | None = None
        self.loopback: Callable[[Event], bool] = lambda event: False  # events the broker routes back

    # --- the transport side --------------------------------------------------

    def start(self, listener: Listener) -> None:
        self.listener = listener

    def publish(self, event: Event) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.is_connected:
            future.set_exception(Disconnected("not connected"))
            return future
        self.published.append((event, future))
        if self.refuse_if is not None and self.refuse_if(event):
            future.set_exception(EventRefused("refused by the fake broker"))
        elif self.auto_complete:
            future.set_result(None)
        if self.loopback(event):
            self.deliver(Command(event.topic, event.payload))
        return future

    def resubscribe(self) -> None:
        self.resubscribes += 1

    def reconnect(self) -> None:
        self.reconnects += 1

    async def close(self, farewell: Event | None = None) -> None:
        self.farewell = farewell
        self.closed = True
        self.is_connected = False

    # --- the broker side, driven by the test -------------------------------

    def connect(self) -> None:
        assert self.listener is not None, "start() the pipeline first"
        self.is_connected = True
        self.listener.connected()

    def command(self, topic: str, payload: bytes, *, retain: bool = False) -> Command:
        cmd = Command(topic, payload, retain)
        cmd.ack = lambda: self.acked.append(payload.decode())
        return cmd

    def deliver(self, *commands: Command) -> None:
        assert self.listener is not None
        self.listener.received(list(commands))

    def pending(self) -> list[tuple[Event, asyncio.Future[None]]]:
        return [(e, f) for e, f in self.published if not f.done()]

    def complete(self, count: int | None = None) -> int:
        """Acknowledges the oldest `count` pending publishes (all by default); how many it did."""
        pending = self.pending()[:count]
        for _, future in pending:
            future.set_result(None)
        return len(pending)

    def drop_connection(self, error: str = "connection lost") -> None:
        """The broker closes the connection: every pending publish fails with `Disconnected`."""
        self.is_connected = False
        for _, future in self.pending():
            future.set_exception(Disconnected(error))
        assert self.listener is not None
        self.listener.disconnected(error)

    def topics(self) -> list[str]:
        return [e.topic for e, _ in self.published]


def fail_pending(futures: Sequence[asyncio.Future[None]], error: TransportError) -> None:
    """Fails every future not yet done (a helper for adapters that lost their connection)."""
    for future in futures:
        if not future.done():
            future.set_exception(error)
