"""Commands from the embedded broker to the pipeline in-process, acknowledged to the client after commit.

With `chat-bridge serve` (no `--broker-url`) broker and bridge are one process: a command amqtt
acknowledged and the bridge had not committed yet would die with them in a crash. So here the PUBACK
to the publishing client is the bridge's acknowledgement, the same meaning as with an external broker
and the bridge's own persistent session: a command acknowledged is committed; one not acknowledged is
sent again by the client's library after it reconnects.

- `AckAfterCommit`, amqtt's protocol handler for one client connection, queues a QoS 1 publish to a
  command topic for delivery without the PUBACK amqtt would send at once; the PUBACK leaves when the
  pipeline acknowledges the command, and PUBACKs leave in the order the publishes arrived (MQTT 3.1.1
  section 4.6), several in one write. A QoS 2 one is delivered on its PUBLISH (once: the same
  packet id again before its PUBREL is not delivered again) and its PUBREC, after which the client
  never sends it again, waits for the commit the same way; amqtt sent PUBREC at once and PUBCOMP
  once it was routed, both before the commit.
- `CommandGate` is where the broker puts the commands it routes (after its topic rules and its flood
  guard; last wills too) and where the pipeline takes them, in order, a burst at a time; commands that
  arrive before the pipeline started wait there (the pipeline's probe marks their end, as with a
  broker's queued backlog). The broker acknowledges at once what it does not hand over (a command
  its rules drop), as amqtt would. The gate holds at most `MAX_BUFFERED` commands or
  `MAX_BUFFERED_BYTES` of payload not yet taken (only while the pipeline has not attached, or its
  loop is stuck, does it hold more than one burst): one more is not kept and not acknowledged, and
  the connection that published it is dropped, so its client's library sends it again, with the
  others not acknowledged yet, once it has reconnected (a QoS 0 command, or a will, is lost; neither
  was ever acknowledged).
- `GateCommands` is the pipeline's side, a `Transport` for the commands; events go straight to the
  broker through `runtime.InProcessEvents` (the probe too, which the broker routes back through the
  gate behind the commands before it).

The pipeline may run on another event loop (another thread) than the broker: commands are handed
over with `call_soon_threadsafe`, and acknowledgements back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.errors import AMQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import INCOMING

from .limits import OncePer
from .transport import Command, Event, Listener

log = logging.getLogger(__name__)

MAX_BUFFERED = 20_000  # commands the gate holds for the pipeline at most
MAX_BUFFERED_BYTES = 32 * 1024 * 1024  # and bytes of their payloads


def _nothing() -> None:
    pass


PUBACK, PUBREC = b"\x40\x02", b"\x50\x02"  # fixed headers of the acknowledgements written here
PUBCOMP = b"\x70\x02"


class _Pending:
    """One QoS 1 or QoS 2 command publish of a connection, waiting for its acknowledgement (`kind`:
    PUBACK or PUBREC)."""

    __slots__ = ("acked", "handler", "kind", "packet_id")

    def __init__(self, handler: AckAfterCommit, packet_id: int, kind: bytes = PUBACK) -> None:
        self.handler = handler
        self.packet_id = packet_id
        self.kind = kind
        self.acked = False

    def __call__(self) -> None:
        self.handler._acked(self)


class AckAfterCommit(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's handler, but a QoS 1 publish to a command topic (`gate.wants`) is acknowledged only when
    the acknowledgement `take_ack` returns for it is called (on the broker's loop)."""

    gate: CommandGate | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unacked: deque[_Pending] = deque()  # in the order the publishes arrived
        self._by_message: dict[int, tuple[Any, _Pending]] = {}  # id(message) -> (message, its ack)
        self._pubacks: list[bytes] = []
        self._writing = False

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        gate = self.gate
        if gate is None or app_message.direction != INCOMING or not gate.wants(app_message.topic):
            await super()._handle_qos1_message_flow(app_message)
            return
        if app_message.packet_id is None or self.session is None:
            raise AMQTTError("a QoS 1 publish without a packet id, or without a session")
        pending = _Pending(self, app_message.packet_id)
        self._unacked.append(pending)
        # the message is kept here until delivered, so its id() is not reused meanwhile
        self._by_message[id(app_message)] = (app_message, pending)
        await self.session.delivered_message_queue.put(app_message)

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        gate = self.gate
        if gate is None or app_message.direction != INCOMING or not gate.wants(app_message.topic):
            await super()._handle_qos2_message_flow(app_message)
            return
        session = self.session
        if app_message.packet_id is None or session is None:
            raise AMQTTError("a QoS 2 publish without a packet id, or without a session")
        packet_id = app_message.packet_id
        received = _qos2_received(session)
        pending = received.get(packet_id)
        if pending is None:  # new: delivered now, PUBREC after the commit
            pending = received[packet_id] = _Pending(self, packet_id, PUBREC)
            session.inflight_in[packet_id] = app_message
            self._unacked.append(pending)
            self._by_message[id(app_message)] = (app_message, pending)
            await session.delivered_message_queue.put(app_message)
        elif pending.acked:  # again after its PUBREC (a DUP, a resumed session): PUBREC again
            self._queue(PUBREC, packet_id)
        elif pending.handler is not self:  # again on a new connection before its commit: PUBREC here
            pending.handler = self
            self._unacked.append(pending)

    async def handle_pubrel(self, pubrel: Any) -> None:
        """The PUBREL of a QoS 2 command (or of one this broker no longer knows, as after a restart):
        PUBCOMP; amqtt answered neither, and the client's library kept waiting for it."""
        packet_id = pubrel.packet_id
        if packet_id in self._pubrel_waiters or self.session is None:
            await super().handle_pubrel(pubrel)  # amqtt's own QoS 2 flow (not a command)
            return
        if _qos2_received(self.session).pop(packet_id, None) is not None:
            self.session.inflight_in.pop(packet_id, None)
        self._queue(PUBCOMP, packet_id)

    def _queue(self, kind: bytes, packet_id: int) -> None:
        self._pubacks.append(kind + packet_id.to_bytes(2, "big"))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write_pubacks())

    def take_ack(self, message: Any) -> Callable[[], None] | None:
        """The acknowledgement of a message taken from the delivery queue (None: not deferred)."""
        entry = self._by_message.pop(id(message), None)
        return entry[1] if entry is not None and entry[0] is message else None

    def _acked(self, pending: _Pending) -> None:
        if pending.acked:
            return
        pending.acked = True
        unacked, ready = self._unacked, self._pubacks
        while unacked and unacked[0].acked:
            done = unacked.popleft()
            if done.handler is self:  # not moved to a newer connection of the session
                ready.append(done.kind + done.packet_id.to_bytes(2, "big"))
        if ready and not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write_pubacks())

    async def _write_pubacks(self) -> None:
        try:
            while self._pubacks and self.writer is not None:
                packets, self._pubacks = self._pubacks, []
                data = b"".join(packets)
                async with self._write_lock:
                    self.writer.write(data)
                    await self.writer.drain()
        except Exception as exc:  # the connection is gone: the client sends them again
            log.debug("PUBACKs not written: %s", exc)
        finally:
            self._pubacks.clear()
            self._writing = False


def _qos2_received(session: Any) -> dict[int, _Pending]:
    """A session's QoS 2 commands delivered and not released yet (kept with the session: a persistent
    one's client may send the PUBLISH again, or its PUBREL, on a later connection)."""
    received: dict[int, _Pending] | None = getattr(session, "_bridge_qos2", None)
    if received is None:
        received = {}
        session._bridge_qos2 = received
    return received


class CommandGate:
    """The embedded broker's commands, on their way to the pipeline; see the module docstring."""

    def __init__(
        self, prefix: str, *, max_buffered: int = MAX_BUFFERED, max_bytes: int = MAX_BUFFERED_BYTES
    ) -> None:
        self._head = f"{prefix}/users/"
        self._lock = threading.Lock()
        self._buffer: list[Command] = []
        self._bytes = 0  # of the payloads in the buffer
        self.max_buffered, self.max_bytes = max_buffered, max_bytes
        self.refused = 0  # commands not kept because the buffer was full
        self._warning = OncePer(60_000)
        self._listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the pipeline's
        self._scheduled = False

    def wants(self, topic: str) -> bool:
        """Whether the topic is one the bridge takes: `{prefix}/users/+/commands/+`."""
        if not topic.startswith(self._head):
            return False
        parts = topic[len(self._head) :].split("/")
        return len(parts) == 3 and parts[1] == "commands"

    # --- the broker's side (on its loop) -------------------------------------------------

    def offer(self, topic: str, payload: bytes, ack: Callable[[], None] | None) -> None:
        """A command routed by the broker; `ack` (on the broker's loop) sends its PUBACK."""
        with self._lock:
            full = len(self._buffer) >= self.max_buffered or self._bytes + len(payload) > self.max_bytes
        if full:
            self._refuse(topic, ack)
            return
        if ack is None:
            ack = _nothing
        else:
            broker_loop = asyncio.get_running_loop()
            if broker_loop is not self._loop:
                ack = _threadsafe(broker_loop, ack)
        with self._lock:
            self._buffer.append(Command(topic, payload, False, ack))
            self._bytes += len(payload)
            due = self._loop is not None and not self._scheduled
            if due:
                self._scheduled = True
            loop = self._loop
        if due and loop is not None:
            if loop is _running_loop():
                loop.call_soon(self._flush)
            else:
                loop.call_soon_threadsafe(self._flush)

    def _refuse(self, topic: str, ack: Callable[[], None] | None) -> None:
        """The buffer is full: the command is not kept, and its connection is dropped unacknowledged
        (so that its client sends it again after reconnecting)."""
        self.refused += 1
        if self._warning.due("full", int(asyncio.get_running_loop().time() * 1000)):
            log.warning(
                "the bridge has not taken %d commands yet (the most kept for it): dropping the "
                "connections that publish more (%s; %d so far), their clients send them again",
                len(self._buffer),
                topic,
                self.refused,
            )
        if isinstance(ack, _Pending):
            _abort(ack.handler.writer)

    # --- the pipeline's side (on its loop) -----------------------------------------------

    def attach(self, listener: Listener) -> None:
        with self._lock:
            self._listener = listener
            self._loop = asyncio.get_running_loop()
            self._scheduled = True
        listener.connected()
        self._loop.call_soon(self._flush)

    def detach(self) -> None:
        with self._lock:
            self._listener = None
            self._loop = None

    def _flush(self) -> None:
        with self._lock:
            commands, self._buffer = self._buffer, []
            self._bytes = 0
            self._scheduled = False
            listener = self._listener
        if commands and listener is not None:
            listener.received(commands)
        elif commands:  # detached meanwhile: they wait, unacknowledged
            with self._lock:
                self._buffer[:0] = commands
                self._bytes += sum(len(c.payload) for c in commands)


def _abort(writer: Any) -> None:
    """Drops a client connection under amqtt's writer adapter (TCP or WebSocket) at once."""
    inner = getattr(writer, "_writer", None) or getattr(writer, "_protocol", None)
    transport = getattr(inner, "transport", None)
    if transport is not None:
        transport.abort()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _threadsafe(loop: asyncio.AbstractEventLoop, ack: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        with contextlib.suppress(RuntimeError):  # the broker's loop is closed: nothing to acknowledge
            loop.call_soon_threadsafe(ack)

    return call


class GateCommands:
    """The commands side of the in-process transport (wrap it in `runtime.InProcessEvents`)."""

    def __init__(self, gate: CommandGate) -> None:
        self.gate = gate

    def start(self, listener: Listener) -> None:
        self.gate.attach(listener)

    def publish(self, event: Event) -> asyncio.Future[None]:  # pragma: no cover - InProcessEvents publishes
        raise NotImplementedError("events go to the broker through InProcessEvents")

    def resubscribe(self) -> None:
        """Nothing to subscribe to: the broker hands every command over."""

    def reconnect(self) -> None:
        """Nothing to reconnect."""

    async def close(self, farewell: Event | None = None) -> None:
        self.gate.detach()
