"""The embedded MQTT broker (amqtt 0.12.1) and what our embedding adds to it.

amqtt reads with a timeout of the client's keepalive but does nothing when it
expires (upstream issue #308), so a client that stops answering without
closing its socket (SIGSTOP, power loss) would never get its will published.
`KeepaliveWatchdog` closes such connections after 1.5 times the keepalive, as
MQTT 3.1.1 (section 3.1.2.10) and Mosquitto do; amqtt then publishes the will.

The broker also serves MQTT over WebSockets (`serve --ws-listen`) at `/mqtt` only, with the
subprotocol `mqtt` (what MQTT.js and paho send). Both listeners go through the same admission
(`EmbeddedBroker._initialize_client_session`), so accounts, the client id rule, the caps, the
password-guessing throttle (per peer address) and the topic rules are the same over both. amqtt waits
for a connection's CONNECT without a limit; here a connection that has not sent one within
`CONNECT_TIMEOUT` seconds (after a WebSocket handshake that itself must finish within
`WS_OPEN_TIMEOUT`) is closed, and a client's packet over `MAX_PACKET` bytes (the shipped
Mosquitto's `max_packet_size`) closes its connection before amqtt reads its body (`PacketLimit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import websockets.asyncio.server
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsWriter,
)
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BasePlugin, BaseTopicPlugin
from amqtt.session import INCOMING, OUTGOING
from amqtt.utils import gen_client_id
from websockets.exceptions import ConnectionClosed

from . import passwords
from .delivery import MAX_QUEUED, Delivery, Fanout, outbox_of, schedule_write
from .inprocess_transport import AckAfterCommit, CommandGate
from .limits import OncePer, RateLimiter
from .netaddr import address_key
from .topics import BRIDGE_ACCOUNT, Topics, client_id_allowed, client_id_owner

log = logging.getLogger(__name__)

KEEPALIVE_FACTOR = 1.5
WATCH_INTERVAL = 0.2
WS_PATH = "/mqtt"  # the only path the WebSockets listener upgrades
WS_OPEN_TIMEOUT = 10.0  # seconds for a WebSocket opening handshake
CONNECT_TIMEOUT = 10.0  # seconds from accepting a connection (TCP or WebSocket) to its CONNECT
MAX_PACKET = 131_072  # bytes of one MQTT packet from a client, as the shipped Mosquitto's max_packet_size
WS_QUEUE = 4  # WebSocket messages a connection buffers before its reader takes them
MAX_HASHING = 16  # password checks (PBKDF2) running or waiting at once; beyond, refused unchecked
MAX_HASHING_PER_ADDRESS = 4  # of which from one address (IPv6: its /64): a crowd there leaves 12
# Retained messages replayed to the new subscriptions of one account (without accounts: of one
# address): bursts of REPLAY_BURST, then REPLAY_RATE a second; beyond, a subscription gets none. A
# SUBSCRIBE to `#` with 5,000 presence topics retained is 5,000 publishes for the broker.
REPLAY_BURST = 20_000
REPLAY_RATE = 1000
MAX_QOS2_INFLIGHT = 32  # a client's QoS 2 publishes waiting for its PUBREL (kept in its session)
# Repeated warnings (refused connections, full queues) are logged at most once a minute per key: a
# crowd of misbehaving clients cannot flood the log.
_LOG_LIMIT = OncePer(60_000)
# The acknowledgement of the client publish being routed (in its client's task), for the command gate.
_ROUTING: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("routing", default=None)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class LogThrottle(logging.Filter):
    """At most `per_minute` warnings (and errors, tracebacks included) a minute from each line of
    amqtt's code: a crowd of clients that never read, or keep failing to log in, would otherwise write
    a line, often a traceback, each. What is held back is counted in the next line let through."""

    def __init__(self, per_minute: int = 5) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._windows: dict[tuple[str, int], tuple[int, int, int]] = {}  # start, passed, held back

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key, now = (record.pathname, record.lineno), _now_ms()
        start, passed, held = self._windows.get(key, (now, 0, 0))
        if now - start >= 60_000:
            start, passed = now, 0
        if passed >= self.per_minute:
            self._windows[key] = (start, passed, held + 1)
            return False
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines held back)"
            record.args = None
        self._windows[key] = (start, passed + 1, 0)
        return True


_THROTTLE = LogThrottle()


class HandshakeFailures(logging.Filter):
    """Turns the websockets library's `opening handshake failed` error and its traceback (a plain HTTP
    request, a wrong path or subprotocol, a client that hangs up) into a one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "opening handshake failed" and record.exc_info and record.exc_info[1]:
            exc = record.exc_info[1]
            reason = str(exc) or type(exc).__name__
            if exc.__cause__ is not None:
                reason = f"{reason} ({exc.__cause__})"
            record.msg, record.args = "refused a WebSocket opening handshake: %s", (reason,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


# The WebSockets listener's logger: warnings only (no line per connection), one line per failed
# handshake, at most a few a minute.
WS_LOG = logging.getLogger("bridge.broker.websockets")
WS_LOG.setLevel(logging.WARNING)
WS_LOG.addFilter(HandshakeFailures())
WS_LOG.addFilter(_THROTTLE)


def throttle_amqtt_logs() -> None:
    """Puts the throttle on every amqtt logger (filters do not apply to child loggers)."""
    for name in ["amqtt", *logging.Logger.manager.loggerDict]:
        if name == "amqtt" or name.startswith("amqtt."):
            logger = logging.getLogger(name)
            if _THROTTLE not in logger.filters:
                logger.addFilter(_THROTTLE)


class WebSocketReader(ReaderAdapter):  # type: ignore[misc]
    """Reads a WebSocket's binary messages as one byte stream, and returns what is left (b"" at the
    end) once the connection is closed, as a TCP stream does.

    amqtt's own `WebSocketsReader` keeps the last message it received and, once the connection is
    closed, appends it again and again while it lacks bytes: an empty message followed by a close
    made it spin for ever without yielding to the event loop (the whole broker and the bridge stood
    still), and a short one was replayed as the next packet's bytes."""

    def __init__(self, websocket: Any) -> None:
        self._websocket = websocket
        self._buffer = bytearray()
        self._closed = False

    async def read(self, n: int = -1) -> bytes:
        wanted = max(n, 1)
        while len(self._buffer) < wanted and not self._closed:
            try:
                message = await self._websocket.recv()
            except ConnectionClosed:
                self._closed = True
                break
            self._buffer += message.encode() if isinstance(message, str) else message
        size = len(self._buffer) if n < 0 else n
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def feed_eof(self) -> None:
        self._closed = True


class PacketLimit(ReaderAdapter):  # type: ignore[misc]
    """A connection's reader that follows MQTT's fixed headers as amqtt reads them: a packet larger
    than `limit` bytes ends the connection once its header is read, before its body (amqtt alone
    reads and keeps packets of up to 256 MB, over TCP and over WebSockets alike). `limit` None: none
    (the bridge's own connection)."""

    def __init__(self, inner: ReaderAdapter, limit: int | None, peer: str) -> None:
        self.inner, self.limit, self.peer = inner, limit, peer
        self.refused = False
        self.pending: int | None = None  # its token in PendingConnections until it logged in
        self._header = -1  # -1: a packet's first byte next; else length bytes read so far
        self._length = 0
        self._body = 0  # bytes of the current packet's body still to come

    async def read(self, n: int = -1) -> bytes:
        if self.refused:
            raise NoDataError("packet too large")
        data: bytes = await self.inner.read(n)
        self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body:
                step = min(self._body, len(data) - i)
                self._body -= step
                i += step
                continue
            byte = data[i]
            i += 1
            if self._header < 0:
                self._header, self._length = 0, 0
                continue
            self._length += (byte & 0x7F) << (7 * self._header)
            self._header += 1
            if byte & 0x80 and self._header < 4:
                continue
            size, self._body, self._header = 1 + self._header + self._length, self._length, -1
            if self.limit is not None and size > self.limit:
                self.refused = True
                if _LOG_LIMIT.due(f"packet {self.peer}", _now_ms()):
                    log.warning(
                        "closed a connection from %s: a packet of %d bytes (the limit is %d)",
                        self.peer,
                        size,
                        self.limit,
                    )
                raise NoDataError("packet too large")

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class GuardedHandler(AckAfterCommit):
    """A client connection's protocol handler (see AckAfterCommit), that keeps at most
    `MAX_QOS2_INFLIGHT` of the client's QoS 2 publishes waiting for their PUBREL: amqtt keeps each,
    of up to `MAX_PACKET` bytes, in the session until then, up to 65,535 of them and after the
    client is gone too (a persistent session for 7 days), so one account that never sends PUBREL
    could make the broker hold gigabytes. One more closes the connection (its will fires), as MQTT 5
    does past a client's receive maximum; the publish is dropped.

    It is also where the bridge's events meet a connection (bridge/delivery.py): once the connection
    is ready for PUBLISHes (after its CONNACK) its session's outbox sends through it, a PUBACK for one
    of them sends the next, and when it stops the outbox waits for the session's next connection."""

    fanout: Fanout | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._emitted: list[bytes] = []  # packets for a WebSocket connection, written under its lock
        self._emitting = False
        self.last_packet = 0.0  # time.monotonic() of the last packet read

    def emit_locked(self, data: bytes) -> None:
        schedule_write(self, data)

    async def _reader_loop(self) -> None:
        """amqtt's reader loop (amqtt/mqtt/protocol/handler.py), leaner for the packets every event
        brings: a PUBACK is handled where it is read instead of in a task of its own; a packet is read
        without a timeout (amqtt's `wait_for` made a task per packet, and did nothing when it expired:
        `KeepaliveWatchdog` closes silent connections, from `last_packet`); the per-packet plugin event
        fires only when a plugin listens. Every other packet is handled as amqtt does, in a task."""
        session = self.session
        if session is None or self._reader_ready is None:
            raise ProtocolHandlerError("the reader loop needs a session")
        running: deque[asyncio.Task[None]] = deque()
        handlers = {
            SUBSCRIBE: self.handle_subscribe,
            UNSUBSCRIBE: self.handle_unsubscribe,
            PUBREC: self.handle_pubrec,
            PUBREL: self.handle_pubrel,
            PUBCOMP: self.handle_pubcomp,
            PINGREQ: self.handle_pingreq,
            PUBLISH: self.handle_publish,
            DISCONNECT: self.handle_disconnect,
            CONNACK: self.handle_connack,
            SUBACK: self.handle_suback,
            UNSUBACK: self.handle_unsuback,
            PINGRESP: self.handle_pingresp,
        }
        callbacks = getattr(self.plugins_manager, "_event_plugin_callbacks", None)
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                if self.reader is None:
                    break
                fixed_header = await MQTTFixedHeader.from_stream(self.reader)
                if not fixed_header:
                    break
                self.last_packet = time.monotonic()
                kind = fixed_header.packet_type
                if kind in (RESERVED_0, RESERVED_15):
                    await self.handle_connection_closed()
                    continue
                packet = await packet_class(fixed_header).from_stream(self.reader, fixed_header=fixed_header)
                if callbacks is None or MQTTEvents.PACKET_RECEIVED in callbacks:
                    await self.plugins_manager.fire_event(
                        MQTTEvents.PACKET_RECEIVED, packet=packet, session=session
                    )
                if kind == PUBACK:
                    await self.handle_puback(packet)
                elif kind == CONNECT:
                    await self.handle_connect(packet)
                elif kind in handlers:
                    running.append(loop.create_task(handlers[kind](packet)))
            except MQTTError:
                log.debug("%s: a packet discarded", session.client_id)
            except asyncio.CancelledError:
                break
            except NoDataError:
                pass
            except Exception as exc:
                log.warning("%s: unhandled exception in the reader: %r", session.client_id, exc)
                break
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _retry_deliveries(self) -> None:
        """amqtt's retries of its own messages in flight, and the session's events (bridge/delivery.py)
        resumed on this connection: first those sent before and not acknowledged (again, DUP), then
        those that waited, in order. amqtt would send the events again under its 5 s timeout and drop
        them at its end."""
        session = self.session
        if session is None:
            raise AMQTTError("Session is not initialized.")
        if self.fanout is not None:
            outbox_of(session).attach(self, self.fanout.window)
        others = [
            message
            for message in (*session.inflight_in.values(), *session.inflight_out.values())
            if not isinstance(message, Delivery)
        ]
        if others:
            await asyncio.wait(
                [asyncio.create_task(asyncio.wait_for(self._handle_message_flow(m), 10)) for m in others]
            )

    async def handle_puback(self, puback: Any) -> None:
        session, fanout = self.session, self.fanout
        if session is not None and fanout is not None:
            out = session.__dict__.get("_bridge_out")
            if out is not None and out.acked(puback.variable_header.packet_id, fanout.window):
                return
        await super().handle_puback(puback)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """amqtt's for a QoS 1 PUBLISH to the client, with the PUBACK's waiter in place before the
        PUBLISH is written: the reader handles a PUBACK as it reads it, and a fast client's PUBACK,
        read while amqtt still awaited the write, found no waiter (`unknown pending message`) and the
        message waited out amqtt's 5 s and was dropped."""
        session = self.session
        packet_id = app_message.packet_id
        if (
            app_message.direction != OUTGOING
            or app_message.qos != 1
            or packet_id is None
            or app_message.puback_packet
            or session is None
        ):
            await super()._handle_qos1_message_flow(app_message)
            return
        session.inflight_out.setdefault(packet_id, app_message)
        retry = app_message.publish_packet is not None
        publish_packet = app_message.build_publish_packet(dup=True) if retry else app_message.build_publish_packet()
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(publish_packet)
            app_message.publish_packet = publish_packet
            app_message.puback_packet = await asyncio.wait_for(waiter, timeout=5)
        except asyncio.TimeoutError:
            msg = f"Timeout waiting for PUBACK for packet ID {packet_id}"
            self.logger.warning(msg)
            raise TimeoutError(msg) from None
        finally:
            self._puback_waiters.pop(packet_id, None)
            session.inflight_out.pop(packet_id, None)

    async def stop(self) -> None:
        session = self.session
        if session is not None:
            out = session.__dict__.get("_bridge_out")
            if out is not None:
                out.detach(self)
        await super().stop()

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        session = self.session
        if (
            app_message.direction == INCOMING
            and session is not None
            and app_message.packet_id not in session.inflight_in
            and len(session.inflight_in) >= MAX_QOS2_INFLIGHT
        ):
            if _LOG_LIMIT.due(f"qos2 {session.client_id}", _now_ms()):
                log.warning(
                    "closing %s: more than %d QoS 2 publishes without their PUBREL",
                    session.client_id,
                    MAX_QOS2_INFLIGHT,
                )
            _abort(self.writer)  # as if the connection dropped: amqtt's reader ends it, the will fires
            return
        await super()._handle_qos2_message_flow(app_message)


def _abort(writer: Any) -> None:
    """Drops a client connection under amqtt's writer adapter (TCP or WebSocket) at once."""
    inner = getattr(writer, "_writer", None) or getattr(writer, "_protocol", None)
    transport = getattr(inner, "transport", None)
    if transport is not None:
        transport.abort()


class BrokerStartError(Exception):
    """The embedded broker cannot start as asked (port taken, password file unusable)."""


class KeepaliveWatchdog(BasePlugin[Any]):  # type: ignore[misc]
    """Disconnects clients silent for more than 1.5 x their keepalive, so their will fires."""

    @dataclass
    class Config:
        factor: float = KEEPALIVE_FACTOR
        interval: float = WATCH_INTERVAL
        max_keepalive: int = 300  # keepalive 0 (none) or above this counts as this

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        # A connection is at least as old as the first time we saw its handler (one that has read no
        # packet yet); each handler notes when it read its last packet (`GuardedHandler`).
        self._first_seen: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        broker = self.context._broker_instance
        while True:
            await asyncio.sleep(self.config.interval)
            now = time.monotonic()
            for client_id, (session, handler) in list(broker.sessions.items()):
                if handler is None or not session.transitions.is_connected():
                    continue
                keepalive = session.keep_alive
                if keepalive <= 0 or keepalive > self.config.max_keepalive:
                    keepalive = self.config.max_keepalive
                since = max(getattr(handler, "last_packet", 0.0), self._first_seen.setdefault(handler, now))
                if now - since > self.config.factor * keepalive:
                    log.info(
                        "client %s silent for %.1fs (keepalive %ss): closing it, its will fires",
                        client_id,
                        now - since,
                        keepalive,
                    )
                    self._first_seen.pop(handler, None)
                    await handler.handle_connection_closed()

    async def close(self) -> None:
        self._task.cancel()


class Accounts:
    """The accounts of a Mosquitto password file, re-read when it changes (`serve --password-file`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._entries: dict[str, str] = {}
        self._verified: dict[str, str] = {}  # user -> hash of the last password that verified

    def current(self) -> dict[str, str]:
        """The entries now (an unreadable file refuses every account until it is fixed)."""
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._entries, self._mtime = passwords.read(self.path), mtime
        except (OSError, passwords.PasswordFileError) as exc:
            if _LOG_LIMIT.due(f"passwd {self.path}", _now_ms()):
                log.error("password file %s cannot be read (%s): refusing its accounts", self.path, exc)
            self._entries, self._mtime = {}, None
        return self._entries

    def verify(self, user: str, password: str) -> bool:
        quick = self.quick(user, password)
        return quick if isinstance(quick, bool) else quick()

    def quick(self, user: str, password: str) -> bool | Callable[[], bool]:
        """False for no such account, True for the password that verified last (reconnects do not
        pay PBKDF2 again); else the check to run, on any thread (it remembers a success)."""
        stored = self.current().get(user)
        if stored is None:
            return False
        key = hashlib.sha256(f"{stored}\0{password}".encode()).hexdigest()
        if self._verified.get(user) == key:
            return True

        def check() -> bool:
            if not passwords.verify(password, stored):
                return False
            self._verified[user] = key
            return True

        return check


class FloodGuard(BaseTopicPlugin):  # type: ignore[misc]
    """The embedded broker's flood guard, as mosquitto/plugins/flood_guard.c is Mosquitto's: a user's
    commands over `rate` per second (bursts of `burst`), whatever connections they come from, are
    dropped here, before they join the one ordered stream of commands the bridge reads. The bridge's
    events and last wills are not limited. Kept above the bridge's own limit."""

    @dataclass
    class Config:
        prefix: str = "chat/v1"
        rate: float = 100.0
        burst: int = 300

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._limiter = RateLimiter(self.config.rate, self.config.burst)
        self._topics = Topics(self.config.prefix)
        self._warning = OncePer(60_000)  # one warning per flooding user per minute

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """Asked only for what the topic rules allow (`EmbeddedBroker._topic_filtering`): with accounts,
        only a command's own user may publish it, so nobody can drain another user's bucket."""
        user = self._topics.command_user(topic) if action == Action.PUBLISH and topic else None
        if user is None:
            return True
        now = int(time.monotonic() * 1000)
        if not self._limiter.take(user, now):
            return True
        if self._warning.due(user, now):
            log.warning(
                "flood guard: dropping commands from %s (client %s) over %g/s (burst %d)",
                user,
                getattr(session, "client_id", None),
                self.config.rate,
                self.config.burst,
            )
        return False


@dataclass(frozen=True)
class AnyTopic(Topics):
    """No topic rules: for tests of MQTT clients that use the embedded broker as a plain broker."""

    def allows(self, username: str | None, topic: str, action: Any, *, retain: bool = False) -> bool:
        return True


@dataclass(frozen=True)
class Caps:
    """What one account may hold in the embedded broker (the bridge's account is not capped), and
    how many connections may wait to log in (`PendingConnections`)."""

    max_connections: int = 20  # open connections per account
    max_sessions: int = 10  # persistent sessions (clean session false) per account
    session_expiry: int = 7 * 24 * 3600  # seconds a disconnected persistent session is kept
    offline_queue: int = 1000  # messages queued for one disconnected persistent session
    max_queued: int = MAX_QUEUED  # events a connected session holds unacknowledged; beyond: closed
    max_keepalive: int = 300  # a keepalive of 0 or above this counts as this (the watchdog)
    max_pending: int = 512  # connections (TCP and WebSockets) not logged in yet, in all
    max_pending_per_address: int = 32  # the same from one address (IPv6: its /64)


class PendingConnections:
    """The connections that have not logged in yet: from the TCP accept (before a WebSocket opening
    handshake) until their CONNECT is answered. At most `per_address` from one address
    (`address_key`) and `total` in all: a new connection beyond either closes the oldest pending one
    there (of its address, or of all). A client that connects and logs in at once is pending for
    milliseconds, so a crowd holding the maximum (until `CONNECT_TIMEOUT`) keeps nobody out, at its
    address or elsewhere, while it cannot hold more than the caps' sockets and buffers. O(1) each."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self._all: OrderedDict[int, tuple[str, Any]] = OrderedDict()  # token -> address, close
        self._by_address: dict[str, OrderedDict[int, None]] = {}
        self._next = 0
        self.closed = 0  # closed to make room

    def add(self, address: str, close: Any) -> int:
        """Counts a new connection (closing the oldest pending ones beyond a cap); its token."""
        while len(self._by_address.get(address, ())) >= self.per_address:
            self._close(next(iter(self._by_address[address])), "from its address")
        while len(self._all) >= self.total:
            self._close(next(iter(self._all)), "in all")
        token, self._next = self._next, self._next + 1
        self._all[token] = (address, close)
        self._by_address.setdefault(address, OrderedDict())[token] = None
        return token

    def done(self, token: int | None) -> None:
        """The connection logged in, was refused or is gone (again: nothing)."""
        entry = self._all.pop(token, None) if token is not None else None
        if entry is None:
            return
        mine = self._by_address[entry[0]]
        del mine[token]  # type: ignore[arg-type]
        if not mine:
            del self._by_address[entry[0]]

    def count(self, address: str | None = None) -> int:
        return len(self._all) if address is None else len(self._by_address.get(address, ()))

    def _close(self, token: int, where: str) -> None:
        address, close = self._all[token]
        self.done(token)
        self.closed += 1
        if _LOG_LIMIT.due(f"pending {address}", _now_ms()):
            cap = self.per_address if where == "from its address" else self.total
            log.warning(
                "closed a connection from %s that had not logged in: %d such connections %s "
                "(--max-pending%s); %d closed so far",
                address,
                cap,
                where,
                "-per-address" if where == "from its address" else "",
                self.closed,
            )
        close()


class _Buckets(OrderedDict[Any, tuple[float, int]]):
    """Token buckets (checks left, when counted) by key, at most `max_tracked`, the least recently
    charged first: charging one is O(1). A missing key has a full bucket, so dropping the oldest
    entry loses nothing once it has refilled (after `burst * every` ms); only when more than
    `max_tracked` keys were charged within that time is an active one dropped (`evicted`)."""

    def __init__(self, burst: float, every_ms: int, max_tracked: int) -> None:
        super().__init__()
        self.burst, self.every_ms, self.max_tracked = burst, every_ms, max_tracked
        self.evicted = 0  # active entries dropped to make room

    def tokens(self, key: Any, now_ms: int) -> float:
        left, at = self.get(key, (self.burst, now_ms))
        return min(self.burst, left + max(0, now_ms - at) / self.every_ms)

    def take(self, key: Any, count: int, now_ms: int) -> bool:
        """Takes `count` (going into debt if need be) unless the bucket is in debt or empty."""
        left = self.tokens(key, now_ms) if key in self else self.burst
        if left < 1:
            return False
        if key in self:
            self.move_to_end(key)
        elif len(self) >= self.max_tracked:
            self.popitem(last=False)
        self[key] = (left - count, now_ms)
        return True

    def refund(self, key: Any, now_ms: int) -> None:
        if key in self:
            self[key] = (min(self.burst, self.tokens(key, now_ms) + 1), now_ms)

    def charge(self, key: Any, now_ms: int) -> None:
        left = self.tokens(key, now_ms)
        if key in self:
            self.move_to_end(key)
        elif len(self) >= self.max_tracked:
            _old, (old_left, old_at) = self.popitem(last=False)
            if old_left + max(0, now_ms - old_at) / self.every_ms < self.burst:
                self.evicted += 1
        self[key] = (max(0.0, left - 1), now_ms)


class FailedLogins:
    """Wrong passwords, counted per address and account and per address alone: of each, `burst`
    (`address_burst`) are checked, then one more every `every_ms` (`address_every_ms`); beyond that a
    CONNECT is refused without checking (the right password too), so guessing costs the broker no
    hashing and the bridge no time. Addresses are counted by `address_key` (IPv6 by its /64).

    One user guessing from an address that others share (a reverse proxy, a NAT) locks out only the
    accounts it guesses; and an account that logged in from the address before still gets its own
    checks once the address as a whole is held back, so a flood of guesses over many names does not
    lock out the address's known users.

    Each table keeps at most `max_tracked` entries, the least recently charged dropped first (O(1) a
    failure). Dropping an entry gives its key a full budget again, so pushing an entry out takes
    `max_tracked` failures of other keys within the minute it takes to refill, and those are
    themselves held back per address: from one address that is hours, and from many addresses
    guessing directly is cheaper. A name longer than any user id is counted by its first 65
    characters (an entry never holds a long string)."""

    def __init__(
        self,
        burst: int = 10,
        every_ms: int = 6000,
        *,
        address_burst: int = 100,
        address_every_ms: int = 600,
        max_tracked: int = 100_000,
    ) -> None:
        self._left = _Buckets(float(address_burst), address_every_ms, max_tracked)  # by address
        self._pairs = _Buckets(float(burst), every_ms, max_tracked)  # by (address, user)
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()  # logged in, oldest first
        self.max_tracked = max_tracked

    @property
    def address_burst(self) -> float:
        return self._left.burst

    @address_burst.setter
    def address_burst(self, value: float) -> None:
        self._left.burst = float(value)

    @property
    def address_every_ms(self) -> int:
        return self._left.every_ms

    @address_every_ms.setter
    def address_every_ms(self, value: int) -> None:
        self._left.every_ms = value

    @staticmethod
    def _pair(address: str, user: str) -> tuple[str, str]:
        return address_key(address), user[:65]

    def allowed(self, address: str, user: str, now_ms: int) -> bool:
        pair = self._pair(address, user)
        if self._pairs.tokens(pair, now_ms) < 1:
            return False
        return pair in self._known or self._left.tokens(pair[0], now_ms) >= 1

    def failed(self, address: str, user: str, now_ms: int) -> None:
        pair = self._pair(address, user)
        self._left.charge(pair[0], now_ms)
        self._pairs.charge(pair, now_ms)

    def refund(self, address: str, user: str, now_ms: int) -> None:
        """Gives back a failure counted before a check that then succeeded."""
        pair = self._pair(address, user)
        self._left.refund(pair[0], now_ms)
        self._pairs.refund(pair, now_ms)

    def succeeded(self, address: str, user: str) -> None:
        pair = self._pair(address, user)
        if pair in self._known:
            self._known.move_to_end(pair)
            return
        self._known[pair] = None
        if len(self._known) > self.max_tracked:
            self._known.popitem(last=False)


class Refused(Exception):
    """A CONNECT refused before any session work: the CONNACK code and why (for the log)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class _Subscriptions(dict):  # type: ignore[type-arg]
    """amqtt's subscriptions (topic filter -> [(session, qos)]), iterated over a snapshot of the
    filters: amqtt loops over them with an await inside (the retained messages of a persistent
    session's filters when it reconnects), and another connection ending meanwhile removed its
    filters: `dictionary changed size during iteration` ended the reconnect half done, the
    session taken for connected with no connection behind it."""

    def __iter__(self) -> Any:
        return iter(list(self.keys()))


class EmbeddedBroker(Broker):  # type: ignore[misc]
    """amqtt's broker, with its connection handling made safe for accounts.

    amqtt 0.12.1 deletes, resumes or takes over the session of a CONNECT's client id first and asks
    the authentication plugins only afterwards; it copies the new CONNECT's will into a live session;
    it publishes wills unchecked. Here every CONNECT is checked first (password, the client id rule,
    the per-account caps); a session is resumed only by the username that created it; a live
    connection is taken over only by its own account, and then closed completely (its own will
    fires) before the new one takes its session; a will is checked against the topic rules when it
    is published. The bridge's client ids (`chat-bridge`, `chat-bridge:<worker>`) need the bridge's
    per-process secret, with accounts and without.

    It also corrects retained messages: on every connect amqtt replays the retained messages of
    *every* client's subscriptions to the new client and never asks the rules whether the client may
    read them; we send a client only the retained messages of its own subscriptions that it may read.
    A retained publish to a command topic is dropped.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topics: Topics,
        bridge_secret: str,
        accounts: Accounts | None = None,
        caps: Caps = Caps(),
        ws_origins: tuple[str, ...] = (),
        commands: CommandGate | None = None,
    ) -> None:
        super().__init__(config)
        self._subscriptions = _Subscriptions()
        self.topics = topics
        self.commands = commands
        self.ws_origins = ws_origins
        self.accounts = accounts
        self.caps = caps
        self.failed_logins = FailedLogins()
        self.pending = PendingConnections(caps.max_pending, caps.max_pending_per_address)
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="passwords")
        self._hashing = 0  # password checks running or waiting for the hasher
        self.max_hashing = MAX_HASHING
        self._hashing_from: dict[str, int] = {}  # the same per address
        self.max_hashing_per_address = MAX_HASHING_PER_ADDRESS
        # retained messages replayed to one account's (or address's) new subscriptions
        self._replays = _Buckets(REPLAY_BURST, 1000 // REPLAY_RATE or 1, 100_000)
        self._bridge_secret = bridge_secret
        self._admitted: dict[int, Any] = {}  # id -> session, between admission and amqtt's auth call
        self._account_task: asyncio.Task[None] | None = None
        self.connect_timeout = CONNECT_TIMEOUT
        self.max_packet: int | None = MAX_PACKET
        self.fanout = Fanout(self, topics, offline_queue=caps.offline_queue, max_queued=caps.max_queued)

    async def start(self) -> None:
        await super().start()
        if self.accounts is not None:
            self._account_task = asyncio.get_running_loop().create_task(self._watch_accounts())

    async def shutdown(self) -> None:
        """Delivers what was already published (the bridge's `offline` status above all) before
        amqtt drops its sessions: amqtt's own shutdown ends the sessions first and loses it."""
        if self._account_task is not None:
            self._account_task.cancel()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (
            not self._broadcast_queue.empty()
            or any(not t.done() for t in self._tasks_queue)
            or self.fanout.pending()
        ):
            await asyncio.sleep(0.01)
        await super().shutdown()
        self._hasher.shutdown(wait=False, cancel_futures=True)

    async def announce_offline(self, topic: str, epoch: str, since: str) -> None:
        """Publishes the bridge's `offline` status in-process unless it is retained already: the bridge's
        MQTT connection may not have got it through before disconnecting (amqtt acknowledges a PUBLISH
        before routing it, and drops it when the DISCONNECT overtakes it)."""
        retained = self._retained_messages.get(topic)
        if retained is not None:
            try:
                current = orjson.loads(bytes(retained.data))
            except orjson.JSONDecodeError:
                current = None
            if (
                isinstance(current, dict)
                and current.get("status") == "offline"
                and current.get("epoch") == epoch
            ):
                return
        payload = orjson.dumps({"status": "offline", "epoch": epoch, "since": since})
        self.deliver([(topic, payload, True)])

    def deliver(self, events: list[tuple[str, bytes, bool]], qos: int = 1) -> None:
        """The bridge's events (topic, payload, retained), in order, straight to the sessions that may
        read them (bridge/delivery.py); a retained one is kept for later subscribers first. On the
        broker's loop."""
        publish, gate = self.fanout.publish, self.commands
        for topic, payload, retain in events:
            if gate is not None and gate.wants(topic):  # the bridge's probe: back to it, behind the commands
                gate.offer(topic, bytes(payload), None)
                if not self.topics.open_access:
                    continue
            if retain:
                self._retain_now(topic, payload)
            publish(topic, payload, qos)

    def _retain_now(self, topic: str, payload: bytes) -> None:
        """amqtt's `retain_message` for the bridge's events, without a coroutine when no plugin listens."""
        if payload:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, 1)
        elif self._retained_messages.pop(topic, None) is None:
            return
        if BrokerEvents.RETAINED_MESSAGE in getattr(
            self.plugins_manager, "_event_plugin_callbacks", {BrokerEvents.RETAINED_MESSAGE: 1}
        ):
            retained = self._retained_messages.get(topic) or RetainedApplicationMessage(None, topic, b"", 1)
            asyncio.get_running_loop().create_task(
                self.plugins_manager.fire_event(
                    BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=retained
                )
            )

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        code = int(await super().add_subscription(subscription, session))
        if code != 0x80:
            self.fanout.subscribed(subscription[0])
        return code

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """amqtt's, over a snapshot of the subscriptions: it awaits the topic rules inside its loop, and a
        session ending meanwhile changed the dictionary under it (`dictionary changed size during
        iteration`, the broadcast loop gone, `offline` never delivered)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for a_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, a_filter):
                continue
            for target_session, sub_qos in list(subscriptions):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if not connected and not target_session.clean_session and qos in (1, 2):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if not connected:
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    # -- listeners ---------------------------------------------------------------------------

    def _limited(self, reader: ReaderAdapter, writer: Any) -> PacketLimit:
        peer = writer.get_peer_info() or ("?", 0)
        return PacketLimit(reader, self.max_packet, str(peer[0]))

    def _pending(self, transport: asyncio.BaseTransport) -> int:
        peer = transport.get_extra_info("peername") or ("?", 0)
        return self.pending.add(address_key(str(peer[0])), transport.abort)  # type: ignore[attr-defined]

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        token = self._pending(writer.transport)
        try:
            adapter = StreamWriterAdapter(writer)
            limited = self._limited(StreamReaderAdapter(reader), adapter)
            limited.pending = token
            await self._client_connected(listener_name, limited, adapter)
        finally:
            self.pending.done(token)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        adapter = WebSocketsWriter(websocket)
        limited = self._limited(WebSocketReader(websocket), adapter)
        limited.pending = getattr(websocket, "pending", None)  # counted since its TCP accept
        await self._client_connected(listener_name, limited, adapter)

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        """amqtt's, but the WebSockets listener upgrades only `/mqtt` (anything else is a 404), bounds
        its opening handshake, and names itself `chat-bridge`."""
        if listener_type != ListenerType.WS:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )
        broker = self

        class Counted(websockets.asyncio.server.ServerConnection):
            """Counted among the pending connections from its TCP accept, before its handshake."""

            pending: int | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.pending = broker._pending(transport)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                broker.pending.done(self.pending)
                super().connection_lost(exc)

        return await websockets.asyncio.server.serve(
            partial(self.ws_connected, listener_name=listener_name),
            address,
            port,
            ssl=ssl_context,
            subprotocols=[websockets.Subprotocol("mqtt")],
            process_request=partial(_admit_handshake, allowed=self.ws_origins),
            open_timeout=WS_OPEN_TIMEOUT,
            server_header="chat-bridge",
            logger=WS_LOG,
            create_connection=Counted,
            # a client's message is at most one MQTT packet's size, and few wait to be read: an
            # unauthenticated connection buffers at most WS_QUEUE of them (websockets' own defaults,
            # 1 MiB and 16, let each hold 16 MiB)
            max_size=MAX_PACKET,
            max_queue=WS_QUEUE,
        )

    # -- admission, before any session work --------------------------------------------------

    async def _verify(self, address: str, user: str, password: str, now: int) -> bool:
        """Whether the password is right (failures counted). PBKDF2 runs on one thread of its own,
        not on the event loop the broker and the bridge share, at most `max_hashing` checks waiting
        (beyond: refused unchecked and not counted, "server unavailable"; the client tries again).
        The failure is counted before the check and given back on success, so guesses sent together
        get no more checks than one after the other."""
        assert self.accounts is not None
        quick = self.accounts.quick(user, password) if user else False
        if isinstance(quick, bool):
            if not quick:
                self.failed_logins.failed(address, user, now)
            return quick
        key = address_key(address)
        mine = self._hashing_from.get(key, 0)
        if self._hashing >= self.max_hashing or mine >= self.max_hashing_per_address:
            raise Refused(
                SERVER_UNAVAILABLE,
                f"{self._hashing} passwords are being checked ({mine} from {address}): {user[:65]!r} not",
            )
        self.failed_logins.failed(address, user, now)
        self._hashing += 1
        self._hashing_from[key] = mine + 1
        try:
            right = await asyncio.get_running_loop().run_in_executor(self._hasher, quick)
        finally:
            self._hashing -= 1
            left = self._hashing_from.pop(key) - 1
            if left:
                self._hashing_from[key] = left
        if right:
            self.failed_logins.refund(address, user, _now_ms())
        return right

    async def _check(self, incoming: Any, address: str = "?") -> None:
        """Raises Refused unless this CONNECT (from this address) may go on to session work."""
        user = incoming.username or ""
        password = incoming.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        client_id = incoming.client_id or ""
        bridge_ids = client_id_owner(client_id) == BRIDGE_ACCOUNT
        if user == BRIDGE_ACCOUNT or bridge_ids:
            if user != BRIDGE_ACCOUNT or not hmac.compare_digest(password, self._bridge_secret):
                raise Refused(NOT_AUTHORIZED, f"client id {client_id!r} / user {user!r} is the bridge's")
            if not bridge_ids:
                raise Refused(
                    IDENTIFIER_REJECTED, f"the bridge's account may not use client id {client_id!r}"
                )
            return
        if self.accounts is not None:
            now, shown = _now_ms(), user[:65]  # (a name may be 64 KiB long: not in the log)
            if not self.failed_logins.allowed(address, user, now):
                raise Refused(NOT_AUTHORIZED, f"{address} failed to log in as {shown!r} too often: unchecked")
            if not await self._verify(address, user, password, now):
                raise Refused(NOT_AUTHORIZED, f"unknown user or wrong password for {shown!r}")
            self.failed_logins.succeeded(address, user)
            if not client_id_allowed(user, client_id):
                raise Refused(
                    IDENTIFIER_REJECTED,
                    f"{user!r} may not use client id {client_id!r} (it must be {user} or {user}:<device>)",
                )
        if incoming.will_flag and not self.topics.allows(
            user or None, incoming.will_topic or "", "publish", retain=bool(incoming.will_retain)
        ):
            raise Refused(NOT_AUTHORIZED, f"the last will of {user!r} targets {incoming.will_topic!r}")
        connected = persistent = 0
        for cid, (session, _handler) in self._sessions.items():
            if cid == client_id or (session.username or "") != user:
                continue
            connected += session.transitions.is_connected()
            persistent += not session.clean_session
        if user and connected >= self.caps.max_connections:
            raise Refused(SERVER_UNAVAILABLE, f"{user!r} has {connected} connections already")
        if user and not incoming.clean_session and persistent >= self.caps.max_sessions:
            raise Refused(SERVER_UNAVAILABLE, f"{user!r} has {persistent} persistent sessions already")

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Any]:
        """A connection is pending (`PendingConnections`) until its CONNECT is answered."""
        try:
            return await self._admit_session(reader, writer)
        finally:
            self.pending.done(getattr(reader, "pending", None))

    async def _admit_session(self, reader: Any, writer: Any) -> tuple[BrokerProtocolHandler, Any]:
        try:
            handler, incoming = await asyncio.wait_for(
                GuardedHandler.init_from_connect(reader, writer, self.plugins_manager),
                self.connect_timeout,
            )
            handler.gate = self.commands
            handler.fanout = self.fanout
        except TimeoutError:
            await writer.close()
            raise AMQTTError(f"no CONNECT within {self.connect_timeout:g} s") from None
        except AMQTTError as exc:
            await writer.close()
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:  # (amqtt left such a connection open: a CONNECT too large, say)
            await writer.close()
            raise AMQTTError(exc) from exc
        try:
            await self._check(incoming, (writer.get_peer_info() or ("?", 0))[0])
            existing = self._sessions.get(incoming.client_id) if incoming.client_id else None
            if existing is not None and (existing[0].username or "") != (incoming.username or ""):
                raise Refused(IDENTIFIER_REJECTED, f"client id {incoming.client_id!r} is another user's")
        except Refused as refused:
            self._refuse(writer, incoming, refused)
            await ConnackPacket.build(0, refused.code).to_stream(writer)
            await writer.close()
            raise MQTTError(str(refused)) from None
        if isinstance(reader, PacketLimit) and (incoming.username or "") == BRIDGE_ACCOUNT:
            reader.limit = None  # its events are bounded by --max-event-size, which may be larger
        if existing is not None and existing[0].transitions.is_connected():
            await self._take_over(*existing)
        # From here on as amqtt does it, for a CONNECT we admitted.
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
            session = incoming
        elif incoming.client_id in self._sessions:
            session = self._sessions[incoming.client_id][0]
            for field in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive"):
                setattr(session, field, getattr(incoming, field))
            session.password = incoming.password
            session.parent = 1
        else:
            incoming.parent = 0
            session = incoming
        self._admitted[id(session)] = session
        return handler, session

    async def _take_over(self, session: Any, handler: Any) -> None:
        """Closes a live connection whose client id a new CONNECT of its own account asked for, and waits
        until it is gone (its will, its own, has been published)."""
        log.info("client %s connects again: closing its previous connection", session.client_id)
        await handler.handle_connection_closed()
        for _ in range(200):
            if not session.transitions.is_connected():
                return
            await asyncio.sleep(0.01)
        await handler.stop()

    def _refuse(self, writer: Any, incoming: Any, refused: Refused) -> None:
        peer = writer.get_peer_info() or ("?", 0)
        key = f"refused {peer[0]}"  # per address: new usernames do not buy more lines
        if _LOG_LIMIT.due(key, _now_ms()):
            log.warning("refused a connection from %s: %s", peer[0], refused)

    async def _authenticate(self, session: Any, _listener: Any) -> bool:
        """Every CONNECT that gets this far was checked (and admitted) before its session work."""
        return self._admitted.pop(id(session), None) is session

    async def _watch_accounts(self) -> None:
        """Closes the connections of accounts removed from the password file (or whose password
        changed) within a second."""
        assert self.accounts is not None
        known = dict(self.accounts.current())
        while True:
            await asyncio.sleep(1.0)
            now = self.accounts.current()
            if now == known:
                continue
            gone = {u for u, h in known.items() if now.get(u) != h}
            known = dict(now)
            for client_id, (session, handler) in list(self._sessions.items()):
                if session.username in gone and handler is not None and session.transitions.is_connected():
                    log.info(
                        "account %s removed or changed: closing its client %s", session.username, client_id
                    )
                    await handler.handle_connection_closed()

    # -- publishing ------------------------------------------------------------------------

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        """The topic rules first; the plugins (the flood guard) only see what the rules allow."""
        if session is None or not self.topics.allows(session.username or None, topic, str(action)):  # type: ignore[arg-type]
            return False
        return bool(await super()._topic_filtering(session, topic, action))

    async def _handle_message_delivery(self, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        deferred = isinstance(handler, AckAfterCommit) and message is not None
        ack = handler.take_ack(message) if deferred else None
        routing = [ack] if ack is not None else None
        token = _ROUTING.set(routing)
        try:
            return await self._deliver(client_session, handler, wait_deliver, message)
        finally:
            _ROUTING.reset(token)
            if routing is not None and routing[0] is not None:
                routing[0]()  # not handed to the bridge (dropped by the rules): acknowledged, as amqtt does

    async def _deliver(self, client_session: Any, handler: Any, wait_deliver: Any, message: Any) -> bool:
        packet = getattr(message, "publish_packet", None)
        user = client_session.username or None
        if (
            message is not None
            and packet is not None
            and packet.retain_flag
            and message.topic
            and not self.topics.allows(user, message.topic, "publish", retain=True)
        ):
            if _LOG_LIMIT.due(f"retained {user}", _now_ms()):
                log.warning(
                    "dropped a retained publish of %s to %s (commands are never retained)",
                    client_session.client_id,
                    message.topic,
                )
            return True
        return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        """With the bridge in this process (`commands`), commands (a client's, a will, the bridge's
        probe) go to it through the gate, with the client's PUBACK as their acknowledgement; without
        accounts, where anybody may read them, subscribers get them too."""
        gate = self.commands
        if gate is not None and topic and gate.wants(topic):
            routing = _ROUTING.get()
            ack = None
            if routing is not None:
                ack, routing[0] = routing[0], None  # handed over: the bridge acknowledges it
            gate.offer(topic, bytes(data or b""), ack)
            if not self.topics.open_access:
                return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
        """amqtt's loop over a connection's subscribes, unsubscribes, publishes and its end, except
        that what the client published before it left is routed first, all of it, and in order:
        amqtt ended the loop at a DISCONNECT (or a dropped connection) with publishes it had
        acknowledged still in the session's queue, and they were never delivered to anyone; and when
        a publish and the end were ready together, it published the will first."""
        waiters = {
            "gone": asyncio.ensure_future(handler.wait_disconnect()),
            "subscribe": asyncio.ensure_future(handler.get_next_pending_subscription()),
            "unsubscribe": asyncio.ensure_future(handler.get_next_pending_unsubscription()),
            "deliver": asyncio.ensure_future(handler.mqtt_deliver_next_message()),
        }
        try:
            while True:
                try:
                    await asyncio.wait(waiters.values(), return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    break
                if waiters["deliver"].done():
                    if not await self._handle_message_delivery(client_session, handler, waiters["deliver"]):
                        break
                    waiters["deliver"] = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if waiters["subscribe"].done():
                    await self._handle_subscription(client_session, handler, waiters["subscribe"])
                    waiters["subscribe"] = asyncio.ensure_future(handler.get_next_pending_subscription())
                if waiters["unsubscribe"].done():
                    await self._handle_unsubscription(client_session, handler, waiters["unsubscribe"])
                    waiters["unsubscribe"] = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if waiters["gone"].done():
                    deliver = waiters["deliver"]
                    taken = deliver.done() and not deliver.cancelled()  # taken meanwhile: it goes first
                    deliver.cancel()
                    if not taken or await self._handle_message_delivery(client_session, handler, deliver):
                        await self._deliver_the_rest(client_session, handler)
                    # the end is handled even after an invalid publish: the session ends, the will fires
                    await self._handle_disconnect(client_session, handler, waiters["gone"])
                    break
        finally:
            for waiter in waiters.values():
                waiter.cancel()
            await asyncio.gather(*waiters.values(), return_exceptions=True)

    async def _deliver_the_rest(self, client_session: Any, handler: Any) -> bool:
        """Routes the publishes still queued from a client that has gone (see `_client_message_loop`);
        False where one of them ends the connection (an invalid topic), as amqtt does."""
        queue = client_session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            message = loop.create_future()
            message.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(client_session, handler, message):
                return False
        return True

    async def _handle_disconnect(self, client_session: Any, handler: Any, disconnect_waiter: Any) -> None:
        """As amqtt's, but a will is published only where its user may publish."""
        result = disconnect_waiter.result()
        if (result is None or not isinstance(result, DisconnectPacket)) and client_session.will_flag:
            topic = client_session.will_topic or ""
            retain = bool(client_session.will_retain)
            if self.topics.allows(client_session.username or None, topic, "publish", retain=retain):
                await self._broadcast_message(
                    client_session, topic, client_session.will_message, client_session.will_qos
                )
                if retain:
                    await self.retain_message(
                        client_session, topic, client_session.will_message, client_session.will_qos
                    )
            else:
                log.warning("dropped the will of %s to %s: not allowed", client_session.client_id, topic)
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Any
    ) -> None:
        """Queues a message for a disconnected persistent session, at most `offline_queue` of them (the
        bridge's own session is not capped); the client catches up from the bridge's history."""
        if (
            target_session.username != BRIDGE_ACCOUNT
            and target_session.retained_messages.qsize() >= self.caps.offline_queue
        ):
            if _LOG_LIMIT.due(f"queue {target_session.client_id}", _now_ms()):
                log.warning(
                    "offline queue of %s is full (%d): dropping what more comes until it reconnects",
                    target_session.client_id,
                    self.caps.offline_queue,
                )
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        matching = [
            (t, r) for t, r in list(self._retained_messages.items()) if self._matches(t, topic_filter)
        ]
        if not matching:
            return
        if session.username != BRIDGE_ACCOUNT:
            # who pays: the account, or without accounts (where names are free) the address
            key = session.username if self.accounts is not None else address_key(str(session.remote_address))
            if not self._replays.take(key, len(matching), _now_ms()):
                if _LOG_LIMIT.due(f"replay {key}", _now_ms()):
                    log.warning(
                        "%s subscribed to retained messages again and again: %s gets none of them for now "
                        "(at most %d a second)",
                        key,
                        session.client_id,
                        REPLAY_RATE,
                    )
                return
        sends = []
        for n, (topic, retained) in enumerate(matching, 1):
            if await self._topic_filtering(session, topic, Action.RECEIVE):
                publish = handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
                sends.append(asyncio.ensure_future(publish))
            if n % 64 == 0:
                await asyncio.sleep(0)  # thousands of them: the others are served meanwhile
        if sends:
            await asyncio.wait(sends)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a WebSocket handshake with this `Origin` (and `Host`) header may go on.

    No `Origin`: not a browser (paho, MQTT.js in Node, tools), which proves who it is with its
    CONNECT. From a browser page, the origin must be one the operator allowed (`--ws-origins`, `*`
    for any), or a page of the same host as the listener when that host is `localhost` or an IP
    address (the browser client served by `--http-listen`). Anything else is a page of some other
    site in the user's browser: without accounts it could act as any user, and a host name (unlike
    an address) can be pointed at 127.0.0.1 by its owner (DNS rebinding)."""
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    try:
        page = urlsplit(origin).hostname
        ours = urlsplit(f"//{host}").hostname if host else None
    except ValueError:
        return False
    if page is None or page != ours:
        return False
    if page == "localhost":
        return True
    try:
        ipaddress.ip_address(page)
    except ValueError:
        return False
    return True


def _admit_handshake(connection: Any, request: Any, *, allowed: tuple[str, ...] = ()) -> Any:
    """Refuses, before the upgrade, a WebSocket handshake for any path but `/mqtt` (404) and one
    from a browser page of an origin that is not allowed (403, see `origin_allowed`)."""
    if urlsplit(request.path).path != WS_PATH:
        return connection.respond(HTTPStatus.NOT_FOUND, f"MQTT over WebSockets is at {WS_PATH}\n")
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.headers.get("Host"), allowed):
        return connection.respond(
            HTTPStatus.FORBIDDEN,
            f"pages of {origin} may not use this broker; its operator can allow them with "
            f"`chat-bridge serve --ws-origins {origin}`\n",
        )
    return None


class InProcessPublisher:
    """Hands the bridge's events straight to the embedded broker, skipping MQTT between the two.

    Through a client connection each event cost a paho publish, a PUBACK to decode and amqtt's whole
    inbound path; this gives them to the broker's direct delivery (`EmbeddedBroker.deliver`, see
    bridge/delivery.py), which applies the same per-subscriber topic rules. Called on the broker's
    loop (`chat-bridge serve`) it delivers at once; from another thread, on the broker's loop. Returns,
    per batch, a future that completes once the broker has taken every event (the broker and the
    bridge share one process, so that is as far as an acknowledgement goes).
    """

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.broker = broker
        self.loop = loop

    def __call__(self, events: list[tuple[str, bytes, bool]]) -> concurrent.futures.Future[None]:
        return self._hand(events, 1)

    def ephemeral(self, events: list[tuple[str, bytes]]) -> concurrent.futures.Future[None]:
        """QoS 0 events (typing), delivered at QoS 0 whatever the subscription's."""
        return self._hand([(topic, payload, False) for topic, payload in events], 0)

    def _hand(self, events: list[tuple[str, bytes, bool]], qos: int) -> concurrent.futures.Future[None]:
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if not here:
            return asyncio.run_coroutine_threadsafe(self._deliver(events, qos), self.loop)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            self.broker.deliver(events, qos)
        except Exception as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    async def _deliver(self, events: list[tuple[str, bytes, bool]], qos: int) -> None:
        self.broker.deliver(events, qos)


def port_problem(host: str, port: int, option: str = "--listen") -> str | None:
    """What is wrong with listening on host:port (for `option`, the flag that chose it), with what to
    do about it; None when the address is free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"{option} {host}:{port}: cannot listen there: {exc.strerror}"
            if option == "--ws-listen":
                return (
                    f"{host}:{port} is already in use (another broker's WebSockets listener, such as "
                    f"Mosquitto's, may be running there). Let the embedded broker serve WebSockets "
                    f"elsewhere, e.g. with `--ws-listen 127.0.0.1:9002`, or not at all with "
                    f"`--ws-listen off`."
                )
            if option == "--http-listen":
                return (
                    f"{host}:{port} is already in use (another web server may be running there). "
                    f"Serve the page and /healthz elsewhere, e.g. with `--http-listen 127.0.0.1:8081`, "
                    f"or not at all with `--http-listen off`."
                )
            return (
                f"{host}:{port} is already in use (another MQTT broker, such as a local Mosquitto, "
                f"may be running there). Either let the embedded broker listen elsewhere, e.g. with "
                f"`--listen 127.0.0.1:1884`, or use the running broker with "
                f"`--broker-url mqtt://{host}:{port}`."
            )
    return None


def check_ports_free(addresses: Sequence[tuple[str, int, str]]) -> None:
    """Fails fast when any of the (host, port, option) addresses is taken, naming every one at once
    (a newcomer with a local Mosquitto on 1883 and 9001 learns both in one go)."""
    problems = [p for host, port, option in addresses if (p := port_problem(host, port, option))]
    if len(problems) == 1:
        raise BrokerStartError(problems[0])
    if problems:
        raise BrokerStartError(
            "these addresses are taken:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n(the options work with `chat-bridge serve` and `scripts/serve` alike)"
        )


def check_port_free(host: str, port: int, option: str = "--listen") -> None:
    """Fails fast, with what to do, when something else already listens there (`option` is the one
    that chose the address: `--listen` or `--ws-listen`)."""
    check_ports_free([(host, port, option)])


@dataclass(frozen=True)
class Security:
    """Accounts and topic rules for the embedded broker (`serve --password-file`)."""

    password_file: Path
    internal_secret: str
    prefix: str = "chat/v1"
    internal_user: str = BRIDGE_ACCOUNT


def flood_guard_for(rate_limit: float, rate_burst: int) -> tuple[float, int] | None:
    """The embedded flood guard's rate and burst: twice the bridge's own limit and half again its
    burst (at least Mosquitto's shipped 100/s and 300), so that the broker never cuts a client the
    bridge would still answer; none when the bridge's limit is off."""
    if rate_limit <= 0:
        return None
    return max(100.0, 2 * rate_limit), max(300, rate_burst * 3 // 2)


def broker_config(
    host: str,
    port: int,
    *,
    prefix: str = "chat/v1",
    guard: tuple[float, int] | None = None,
    caps: Caps = Caps(),
    ws_listen: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """amqtt's configuration. Accounts and topic rules are not plugins: `EmbeddedBroker` applies them
    before amqtt's own connection handling. `ws_listen` adds the WebSockets listener."""
    plugins: dict[str, Any] = {"bridge.broker.KeepaliveWatchdog": {"max_keepalive": caps.max_keepalive}}
    if guard is not None:
        plugins["bridge.broker.FloodGuard"] = {"prefix": prefix, "rate": guard[0], "burst": guard[1]}
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_listen is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{ws_listen[0]}:{ws_listen[1]}"}
    return {
        "listeners": listeners,
        "timeout_disconnect_delay": 0,
        "session_expiry_interval": caps.session_expiry,
        "plugins": plugins,
    }


async def start_broker(
    host: str,
    port: int,
    security: Security | None = None,
    *,
    prefix: str = "chat/v1",
    guard: tuple[float, int] | None = None,
    bridge_secret: str | None = None,
    caps: Caps = Caps(),
    topic_rules: bool = True,
    ws_listen: tuple[str, int] | None = None,
    ws_origins: tuple[str, ...] = (),
    commands: CommandGate | None = None,
) -> EmbeddedBroker:
    """Starts amqtt in the running event loop (it must be built inside one).

    With `security`, clients need an account of its password file; the bridge's account (client ids
    `chat-bridge`, `chat-bridge:<worker>`) needs `security.internal_secret`. Without, anybody may
    connect but the bridge's client ids still need `bridge_secret` (a random one if not given).
    `topic_rules=False` lets anybody publish and read anything (tests of MQTT clients only).
    `ws_listen` (host, port): also serve MQTT over WebSockets there, at `/mqtt`, to browser pages of
    the `ws_origins` (besides same-host pages of localhost or an IP address; see `origin_allowed`).
    `commands`: the bridge in this process takes the commands from there (see
    bridge/inprocess_transport.py), and a client's command is acknowledged once the bridge committed it."""
    check_port_free(host, port)
    if ws_listen is not None:
        check_port_free(*ws_listen, option="--ws-listen")
    accounts = None
    if security is not None:
        if not security.password_file.is_file():
            raise BrokerStartError(
                f"password file {security.password_file} does not exist; create accounts "
                f"with `chat-bridge users add NAME --password-file {security.password_file}`"
            )
        try:
            passwords.read(security.password_file)
        except (OSError, passwords.PasswordFileError) as exc:
            raise BrokerStartError(str(exc)) from None
        accounts = Accounts(security.password_file)
        bridge_secret, prefix = security.internal_secret, security.prefix
    broker = EmbeddedBroker(
        broker_config(host, port, prefix=prefix, guard=guard, caps=caps, ws_listen=ws_listen),
        topics=Topics(prefix, open_access=accounts is None) if topic_rules else AnyTopic(prefix),
        bridge_secret=bridge_secret or secrets.token_urlsafe(32),
        accounts=accounts,
        caps=caps,
        ws_origins=ws_origins,
        commands=commands,
    )
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        raise BrokerStartError(f"the embedded broker could not start on {host}:{port}: {exc}") from None
    throttle_amqtt_logs()
    log.info("embedded MQTT broker listening on %s:%d", host, port)
    if ws_listen is not None:
        log.info("embedded MQTT broker serving WebSockets on %s", ws_url(*ws_listen))
    return broker


def ws_url(host: str, port: int) -> str:
    """The URL MQTT-over-WebSockets clients on this host connect to for a `--ws-listen` address."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"ws://{f'[{host}]' if ':' in host else host}:{port}{WS_PATH}"
