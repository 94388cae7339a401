"""A small asyncio MQTT 3.1.1 client for the bridge's hot path.

What it does, and why it is this way:

- One event loop, no threads. Packets are encoded and decoded by
  `mqtt_codec`; outgoing packets written in one loop iteration leave in one
  `write` (one system call), and TCP_NODELAY is set so they leave at once.
- `publish()` returns a future: QoS 0 completes when written, QoS 1 when the
  broker's PUBACK arrives. `publish_then()` takes a callback instead, called
  at once when the PUBACK is handled (no future, no extra loop iteration:
  the bridge's hot path), and on the next iteration with the error. At most
  `window` QoS 1 publishes are in flight; the rest wait here, in order, and
  are sent as acknowledgements free the window. In-flight publishes live in
  a dict keyed by packet id, so a PUBACK costs O(1) whatever the window. A
  publish whose packet would exceed `max_packet_size` fails at once with
  `PacketTooLarge` (a broker with a lower limit would drop the connection,
  or the message, silently).
- Received QoS 1 publishes are acknowledged only when the application calls
  `ack(message)`, and the PUBACKs go out in the order the publishes arrived
  (MQTT 3.1.1 section 4.6): an early `ack` waits for the ones before it.
  An ack of a message from an earlier connection is dropped: the broker
  redelivers that message on the new connection.
- The connection is kept alive with PINGREQ every `keepalive / 2` seconds;
  a PINGRESP that has not arrived by the next ping drops the connection.
- A lost connection is re-established with exponential backoff (and jitter).
  Unacknowledged QoS 1 publishes are re-sent with DUP on reconnect, in their
  original order, before anything new (MQTT 3.1.1 section 4.4); with
  `resend_on_reconnect=False` they fail with `ConnectionLost` instead and a
  QoS 1 publish while disconnected fails at once, for a caller that decides
  itself what to send again (the bridge's pipeline does).
- Anything malformed from the broker (see `mqtt_codec.Decoder`) drops the
  connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import mqtt_codec as codec
from .mqtt_codec import MalformedPacket, PacketTooLarge, Will

__all__ = [
    "Client",
    "ConnectionLost",
    "ConnectionRefused",
    "MalformedPacket",
    "Message",
    "MqttError",
    "NotConnected",
    "PacketTooLarge",
    "Will",
]

log = logging.getLogger(__name__)


class MqttError(Exception):
    """Base of the client's errors (the codec's MalformedPacket and PacketTooLarge are ValueErrors)."""


class ConnectionRefused(MqttError):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"the broker refused the connection: {codec.CONNACK_REASONS.get(code, code)}")


class ConnectionLost(MqttError):
    """The connection dropped before the request was answered."""


class NotConnected(MqttError):
    """A QoS 0 publish, or a subscription, while there is no connection."""


@dataclass(slots=True, eq=False)
class Message:
    """A publish the broker delivered; a QoS 1 one waits for `Client.ack`."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    _connection: int = 0
    _acked: bool = False


class _Then:
    """A publish's completion as a callback (`Client.publish_then`), in the part of a future's interface
    the client uses: success calls it at once, an error on the next loop iteration (as a future's
    callbacks would run), so that it never runs inside `publish()` itself."""

    __slots__ = ("_callback", "_done")

    def __init__(self, callback: Callable[[BaseException | None], object]) -> None:
        self._callback = callback
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, _result: None) -> None:
        self._done = True
        try:
            self._callback(None)
        except Exception:
            log.exception("a publish callback failed")

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        asyncio.get_running_loop().call_soon(self._callback, error)


@dataclass(slots=True, eq=False)
class _Outgoing:
    topic: bytes
    payload: bytes
    retain: bool
    future: asyncio.Future[None] | _Then
    packet: bytes = b""  # once sent: the PUBLISH as sent (re-sent with DUP after a reconnect)


@dataclass(slots=True)
class _Stats:
    connections: int = 0
    pings: int = 0
    pongs: int = 0
    dropped_stale_acks: int = 0
    resent: int = 0


@dataclass(slots=True, eq=False)
class _Connection:
    """One TCP (or TLS) connection: its transport and what belongs to it only."""

    number: int
    transport: asyncio.Transport | None = None
    connack: asyncio.Future[codec.Connack] | None = None
    lost: asyncio.Future[None] | None = None
    received: deque[Message] = field(default_factory=deque)
    ping_due: bool = False
    ping_timer: asyncio.TimerHandle | None = None
    out: list[bytes] = field(default_factory=list)
    flushing: bool = False
    up: bool = False  # CONNACK accepted


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client, conn: _Connection) -> None:
        self.client = client
        self.conn = conn
        self.decoder = codec.Decoder(from_server=True, max_packet_size=client.max_incoming_packet_size)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # events must leave at once, not wait for the ack of the one before (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except (MalformedPacket, PacketTooLarge) as exc:
            self.client._drop(self.conn, f"malformed input from the broker: {exc}")
            return
        client, conn = self.client, self.conn
        messages: list[Message] = []
        for packet in packets:
            if conn.transport is None:
                return  # dropped while handling an earlier packet
            try:
                message = client._handle(conn, packet)
            except MalformedPacket as exc:
                client._drop(conn, f"protocol violation by the broker: {exc}")
                return
            if message is not None:
                messages.append(message)
        if messages:
            client._deliver(messages)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self.conn, exc)


class Client:
    """See the module docstring. Use from one event loop; `start()` then `publish`/`subscribe`/`ack`.

    The exceptions a publish's future fails with are class attributes, so that an adapter can fail
    them with its own error types (subclasses of these) without wrapping every future.
    """

    publish_lost: type[ConnectionLost] = ConnectionLost
    publish_not_connected: type[NotConnected] = NotConnected
    publish_too_large: type[PacketTooLarge] = PacketTooLarge
    publish_invalid: type[ValueError] = ValueError

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str,
        keepalive: int = 30,
        clean_session: bool = False,
        will: Will | None = None,
        username: str | None = None,
        password: str | bytes | None = None,
        ssl: ssl_module.SSLContext | None = None,
        window: int = 1000,
        max_packet_size: int = codec.MAX_REMAINING_LENGTH + 5,
        max_incoming_packet_size: int = codec.MAX_REMAINING_LENGTH + 5,
        connect_timeout: float = 10.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 10.0,
        resend_on_reconnect: bool = True,
        on_message: Callable[[Message], None] | None = None,
        on_messages: Callable[[list[Message]], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[BaseException | None], None] | None = None,
        on_connect_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if not 0 < window < 65_535:
            raise ValueError("window must be between 1 and 65534")
        if not 0 <= keepalive <= 65_535:
            raise ValueError("keepalive must be between 0 and 65535 seconds")
        self.host, self.port = host, port
        self.client_id = client_id
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.username = username
        self.password = password.encode() if isinstance(password, str) else password
        self.ssl = ssl
        self.window = window
        self.max_packet_size = max_packet_size
        self.max_incoming_packet_size = max_incoming_packet_size
        self.connect_timeout = connect_timeout
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.resend_on_reconnect = resend_on_reconnect
        self.on_message = on_message
        self.on_messages = on_messages
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_connect_error = on_connect_error
        self.stats = _Stats()
        self._conn: _Connection | None = None
        self._connections = 0
        self._in_flight: dict[int, _Outgoing] = {}  # sent, awaiting PUBACK, oldest first
        self._waiting: deque[_Outgoing] = deque()  # beyond the window, not yet sent
        self._requests: dict[int, tuple[int, asyncio.Future[list[int]]]] = {}  # SUBSCRIBE/UNSUBSCRIBE
        self._topics: dict[str, bytes] = {}  # topics checked and encoded, the latest few thousand
        self._next_id = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.up

    def start(self) -> None:
        """Keeps a connection up (reconnecting with backoff) until `stop()`; returns at once (call it
        from the event loop)."""
        if self._supervisor is None:
            self._stopping = False
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def connect(self) -> bool:
        """One connection attempt (no reconnects); True when the broker kept a session. Raises on failure."""
        return await self._connect_once()

    async def stop(self, *, disconnect: bool = True) -> None:
        """Stops reconnecting and closes; with `disconnect` a DISCONNECT first (the broker drops the will)."""
        self._stopping = True
        conn = self._conn
        if conn is not None and conn.transport is not None:
            if disconnect and conn.up:
                self._send(conn, codec.DISCONNECT_PACKET)
                self._flush(conn)
            conn.transport.close()
            if conn.lost is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.lost), 5)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._fail_publishes(self.publish_lost("the client stopped before the broker acknowledged"))

    def _fail_publishes(self, error: MqttError) -> None:
        for item in [*self._in_flight.values(), *self._waiting]:
            if not item.future.done():
                item.future.set_exception(error)
        self._in_flight.clear()
        self._waiting.clear()

    def reconnect(self) -> None:
        """Ends the connection with a DISCONNECT (the broker drops the will) and makes a new one."""
        conn = self._conn
        if conn is not None and conn.transport is not None:
            if conn.up:
                self._send(conn, codec.DISCONNECT_PACKET)
                self._flush(conn)
            conn.transport.close()

    def abort(self) -> None:
        """Drops the connection without DISCONNECT (the broker then publishes the will); tests use it."""
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.abort()

    async def _supervise(self) -> None:
        delay = self.reconnect_min
        while not self._stopping:
            try:
                await self._connect_once()
                delay = self.reconnect_min
                conn = self._conn
                assert conn is not None and conn.lost is not None
                await asyncio.shield(conn.lost)
                if self._stopping:
                    return
                # a connection that was up reconnects quickly; one that keeps failing backs off
                await asyncio.sleep(random.uniform(0, self.reconnect_min))
                continue
            except ConnectionRefused as exc:
                log.error("%s; retrying in %.1fs", exc, delay)
                self._connect_failed(exc)
            except (TimeoutError, OSError, MqttError, ValueError) as exc:
                self._connect_failed(exc)
                log.warning(
                    "cannot connect to %s:%d (%s); retrying in %.1fs",
                    self.host,
                    self.port,
                    exc or type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.reconnect_max)

    def _connect_failed(self, exc: BaseException) -> None:
        if self.on_connect_error is not None:
            try:
                self.on_connect_error(exc)
            except Exception:
                log.exception("on_connect_error failed")

    async def _connect_once(self) -> bool:
        loop = asyncio.get_running_loop()
        self._connections += 1
        conn = _Connection(self._connections, connack=loop.create_future(), lost=loop.create_future())
        self._conn = conn
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self, conn),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                self.connect_timeout,
            )
            self._send(
                conn,
                codec.encode_connect(
                    codec.Connect(
                        self.client_id,
                        self.keepalive,
                        self.clean_session,
                        self.will,
                        self.username,
                        self.password,
                    )
                ),
            )
            assert conn.connack is not None
            connack = await asyncio.wait_for(asyncio.shield(conn.connack), self.connect_timeout)
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        if connack.return_code:
            if conn.transport is not None:
                conn.transport.close()
            raise ConnectionRefused(connack.return_code)
        return connack.session_present

    def _accepted(self, conn: _Connection, connack: codec.Connack) -> None:
        """CONNACK accepted: runs before any PUBLISH that arrived with it is handled."""
        conn.up = True
        self.stats.connections += 1
        self._connected.set()
        if self.keepalive:
            conn.ping_timer = asyncio.get_running_loop().call_later(self.keepalive / 2, self._ping, conn)
        # re-send what the broker has not acknowledged, in order, then what waited
        for item in self._in_flight.values():
            item.packet = bytes((item.packet[0] | 0x08,)) + item.packet[1:]
            self._send(conn, item.packet)
            self.stats.resent += 1
        self._fill_window(conn)
        log.info("connected to %s:%d (session present: %s)", self.host, self.port, connack.session_present)
        if self.on_connect is not None:
            try:
                self.on_connect(connack.session_present)
            except Exception:
                log.exception("on_connect failed")

    # --- sending ------------------------------------------------------------------

    def _send(self, conn: _Connection, data: bytes) -> None:
        """Queues a packet; everything queued in this loop iteration leaves in one write."""
        conn.out.append(data)
        if not conn.flushing:
            conn.flushing = True
            asyncio.get_running_loop().call_soon(self._flush, conn)

    def _flush(self, conn: _Connection) -> None:
        conn.flushing = False
        if conn.out and conn.transport is not None:
            data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
            conn.transport.write(data)
        conn.out.clear()

    def _packet_id(self) -> int:
        pid = self._next_id
        while True:
            pid = pid + 1 if pid < 65_535 else 1
            if pid not in self._in_flight and pid not in self._requests:
                self._next_id = pid
                return pid

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> asyncio.Future[None]:
        """Sends (or queues) a publish; the future completes when it is written (QoS 0) or acknowledged."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._publish(topic, payload, qos, retain, future)
        return future

    def publish_then(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        callback: Callable[[BaseException | None], object],
    ) -> None:
        """As `publish`, but `callback(None)` runs as soon as the publish is acknowledged (written, QoS 0),
        and `callback(error)` on the next loop iteration when it fails (the errors of `publish`)."""
        self._publish(topic, payload, qos, retain, _Then(callback))

    def _publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, future: asyncio.Future[None] | _Then
    ) -> None:
        raw_topic = self._topics.get(topic)
        if raw_topic is None:
            try:
                raw_topic = codec.topic_bytes(topic)
            except ValueError as exc:
                future.set_exception(self.publish_invalid(str(exc)))
                return
            if len(self._topics) >= 4096:
                self._topics.clear()
            self._topics[topic] = raw_topic
        size = len(raw_topic) + len(payload) + (4 if qos else 2)
        # + the fixed header: one byte and the remaining length's one to four
        size += 2 if size < 128 else 3 if size < 16_384 else 4 if size < 2_097_152 else 5
        if size > self.max_packet_size:
            future.set_exception(
                self.publish_too_large(
                    f"a publish of {size} bytes exceeds the limit of {self.max_packet_size}"
                )
            )
            return
        conn = self._conn
        if qos == 0:
            if conn is None or not conn.up:
                future.set_exception(self.publish_not_connected("not connected: a QoS 0 publish is not kept"))
            else:
                self._send(conn, codec.encode_publish(raw_topic, payload, 0, retain))
                future.set_result(None)
            return
        if qos != 1:
            future.set_exception(self.publish_invalid("this client publishes at QoS 0 or 1"))
            return
        if not self.resend_on_reconnect and (conn is None or not conn.up):
            future.set_exception(self.publish_not_connected("not connected"))
            return
        item = _Outgoing(raw_topic, payload, retain, future)
        if conn is not None and conn.up and not self._waiting and len(self._in_flight) < self.window:
            self._send_item(conn, item)
        else:
            self._waiting.append(item)

    def _send_item(self, conn: _Connection, item: _Outgoing) -> None:
        pid = self._packet_id()
        item.packet = codec.encode_publish(item.topic, item.payload, 1, item.retain, pid)
        self._in_flight[pid] = item
        self._send(conn, item.packet)

    def _fill_window(self, conn: _Connection) -> None:
        waiting, in_flight = self._waiting, self._in_flight
        while waiting and len(in_flight) < self.window:
            item = waiting.popleft()
            if not item.future.cancelled():
                self._send_item(conn, item)

    @property
    def in_flight(self) -> int:
        """QoS 1 publishes sent and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """QoS 1 publishes waiting for room in the window (or for a connection)."""
        return len(self._waiting)

    async def subscribe(self, topics: list[tuple[str, int]]) -> list[int]:
        """Subscribes and returns the broker's return codes (0x80 = refused)."""
        return await self._request(lambda pid: codec.encode_subscribe(pid, topics), codec.SUBACK, len(topics))

    async def unsubscribe(self, topics: list[str]) -> None:
        await self._request(lambda pid: codec.encode_unsubscribe(pid, topics), codec.UNSUBACK, 0)

    async def _request(self, encode: Callable[[int], bytes], answer: int, count: int) -> list[int]:
        conn = self._conn
        if conn is None or not conn.up:
            raise NotConnected("not connected")
        pid = self._packet_id()
        packet = encode(pid)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._requests[pid] = (answer, future)
        self._send(conn, packet)
        try:
            codes = await future
        finally:
            self._requests.pop(pid, None)
        if answer == codec.SUBACK and len(codes) != count:
            self._drop(conn, "SUBACK with a return code count that does not match the SUBSCRIBE")
            raise ConnectionLost("the broker answered the subscription with a malformed SUBACK")
        return codes

    def ack(self, message: Message) -> None:
        """The application is done with `message`: PUBACK it, after every earlier publish was."""
        if message.qos == 0 or message._acked:
            return
        message._acked = True
        conn = self._conn
        if conn is None or conn.number != message._connection or conn.transport is None:
            self.stats.dropped_stale_acks += 1
            return
        received = conn.received
        while received and received[0]._acked:
            self._send(conn, codec.encode_puback(received.popleft().packet_id))

    # --- receiving ----------------------------------------------------------------

    def _deliver(self, messages: list[Message]) -> None:
        if self.on_messages is not None:
            try:
                self.on_messages(messages)
            except Exception:
                log.exception("the message callback failed; the messages stay unacknowledged")
        elif self.on_message is not None:
            for message in messages:
                try:
                    self.on_message(message)
                except Exception:
                    log.exception("the message callback failed on %r; it stays unacknowledged", message.topic)

    def _handle(self, conn: _Connection, packet: codec.Packet) -> Message | None:
        """Acts on one packet from the broker; a PUBLISH is returned for delivery."""
        kind = type(packet)
        if kind is codec.Puback:
            assert isinstance(packet, codec.Puback)
            item = self._in_flight.pop(packet.packet_id, None)
            if item is None:
                log.debug("PUBACK for unknown packet id %d ignored", packet.packet_id)
                return None
            if not item.future.done():
                item.future.set_result(None)
            if self._waiting:
                self._fill_window(conn)
        elif kind is codec.Publish:
            assert isinstance(packet, codec.Publish)
            if not conn.up:
                raise MalformedPacket("PUBLISH before CONNACK")
            message = Message(
                packet.topic,
                packet.payload,
                packet.qos,
                packet.retain,
                packet.dup,
                packet.packet_id,
                conn.number,
            )
            if packet.qos:
                conn.received.append(message)
            return message
        elif kind is codec.Connack:
            assert isinstance(packet, codec.Connack)
            if conn.connack is None or conn.connack.done():
                raise MalformedPacket("a second CONNACK")
            if packet.return_code == 0:
                self._accepted(conn, packet)
            conn.connack.set_result(packet)
        elif kind is codec.Pingresp:
            conn.ping_due = False
            self.stats.pongs += 1
        elif kind is codec.Suback or kind is codec.Unsuback:
            assert isinstance(packet, codec.Suback | codec.Unsuback)
            request = self._requests.get(packet.packet_id)
            expected = codec.SUBACK if kind is codec.Suback else codec.UNSUBACK
            if request is None or request[0] != expected:
                name = codec.NAMES[expected]
                raise MalformedPacket(f"{name} for packet id {packet.packet_id} not asked for")
            if not request[1].done():
                request[1].set_result(packet.return_codes if isinstance(packet, codec.Suback) else [])
        else:  # pragma: no cover - the decoder lets through only what a server may send
            raise MalformedPacket(f"unexpected {kind.__name__}")
        return None

    def _ping(self, conn: _Connection) -> None:
        if conn.transport is None or self._conn is not conn:
            return
        if conn.ping_due:
            self._drop(conn, f"no PINGRESP within {self.keepalive / 2:g}s")
            return
        conn.ping_due = True
        self.stats.pings += 1
        self._send(conn, codec.PINGREQ_PACKET)
        conn.ping_timer = asyncio.get_running_loop().call_later(self.keepalive / 2, self._ping, conn)

    def _drop(self, conn: _Connection, reason: str) -> None:
        log.warning("dropping the connection to %s:%d: %s", self.host, self.port, reason)
        if conn.transport is not None:
            conn.transport.abort()

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        was_up = conn.up
        conn.up = False
        conn.transport = None
        conn.out.clear()
        conn.received.clear()
        if conn.ping_timer is not None:
            conn.ping_timer.cancel()
        if conn.connack is not None and not conn.connack.done():
            conn.connack.set_exception(ConnectionLost(f"the connection closed before CONNACK ({exc})"))
            conn.connack.exception()  # retrieved: the connect attempt reports it
        if self._conn is conn:
            self._connected.clear()
            for pid, (_, future) in list(self._requests.items()):
                if not future.done():
                    future.set_exception(ConnectionLost("the connection dropped"))
                del self._requests[pid]
            if not self.resend_on_reconnect:
                self._fail_publishes(
                    self.publish_lost("the connection dropped before the broker acknowledged")
                )
        if conn.lost is not None and not conn.lost.done():
            conn.lost.set_result(None)
        if was_up:
            if not self._stopping:
                log.warning("lost the connection to %s:%d (%s)", self.host, self.port, exc or "closed")
            if self.on_disconnect is not None:
                self.on_disconnect(exc)
