"""The transport on paho-mqtt: one network thread for paho, everything else on the event loop.

paho's callbacks run on its network thread; they only append to a list and, once per burst,
schedule the list's hand-over on the event loop (one `call_soon_threadsafe` per burst, not per
message). Publishes and acknowledgements are made from the event loop (paho writes to the socket
from the calling thread, under its own locks).

The network thread connects and reconnects by itself, with a backoff, and reports every failure
with the broker and the error (an unreachable or unresolvable broker is named at once, not
retried silently). After a lost connection paho would send its unacknowledged publishes again by
itself; the transport drops them instead and fails their completions with `Disconnected`, so the
pipeline decides what goes again (and sets aside an event the broker keeps disconnecting on).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import BrokerAddress
from .transport import Command, Disconnected, Event, Listener, TransportError

log = logging.getLogger(__name__)


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Events go out as soon as they are published: an event must not wait for the ack of the one
    before it (Nagle's algorithm), which paho leaves on."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def describe(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


class PahoTransport:
    """Commands from `command_filter` (QoS 1, acknowledged by `Command.ack`), events out at QoS 1.

    A fixed client id and a persistent session: commands published while the bridge is away are
    queued by the broker and delivered when it returns. `will` is the broker's last will for us.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        command_filter: str,
        *,
        client_id: str = "chat-bridge",
        keepalive: int = 30,
        will: Event | None = None,
        backoff: tuple[float, float] = (0.25, 10.0),
        stable_after: float = 5.0,
        quick_retry_max: float = 2.0,
    ) -> None:
        self.broker = broker
        self.command_filter = command_filter
        self.keepalive = keepalive
        self.backoff = backoff
        self.stable_after = stable_after  # a connection that lasted this long resets the backoff
        self.quick_retry_max = quick_retry_max  # the longest wait after a connection that was made
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        # paho keys publishes by a 16-bit message id and silently drops one once 65,535 wait; the
        # pipeline's publish window stays far below.
        self.client.max_queued_messages_set(60_000)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = _no_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._up = False  # loop thread's view: connected and subscribed
        self._pending: dict[int, asyncio.Future[None]] = {}  # mid -> completion
        # filled on the network thread, handed over on the loop
        self._incoming: list[Command] = []
        self._acked: deque[int] = deque()
        self._scheduled = False
        self._connected_at = 0.0

    # --- Transport -------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._thread = threading.Thread(target=self._network, name="mqtt-network", daemon=True)
        self._thread.start()

    def publish(self, event: Event) -> asyncio.Future[None]:
        assert self._loop is not None
        future = self._loop.create_future()
        if not self._up:
            future.set_exception(Disconnected("not connected"))
            return future
        info = self.client.publish(event.topic, event.payload, qos=event.qos, retain=event.retain)
        if info.rc in (paho.MQTT_ERR_CONN_LOST, paho.MQTT_ERR_NO_CONN):
            future.set_exception(Disconnected(paho.error_string(info.rc)))
            return future  # dropped from paho's queue before the reconnect
        if info.rc != paho.MQTT_ERR_SUCCESS:
            future.set_exception(TransportError(paho.error_string(info.rc)))
            return future
        if event.qos:
            self._pending[info.mid] = future
        else:
            future.set_result(None)  # QoS 0: nothing to wait for
        return future

    def resubscribe(self) -> None:
        self.client.subscribe(self.command_filter, qos=1)

    def reconnect(self) -> None:
        self.client.disconnect()  # a clean DISCONNECT: the broker drops our will; the thread reconnects

    async def close(self, farewell: Event | None = None) -> None:
        if farewell is not None and self._up:
            try:
                await asyncio.wait_for(self.publish(farewell), timeout=5)
            except (TransportError, TimeoutError) as exc:
                log.warning("could not announce %r before stopping: %s", farewell.topic, exc)
        self._closing.set()
        self._up = False
        self.client.disconnect()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        self._fail_pending("stopped")

    # --- the network thread --------------------------------------------------------

    def _network(self) -> None:
        delay = self.backoff[0]
        while not self._closing.is_set():
            cap = self.backoff[1]
            try:
                self.client.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
            except Exception as exc:
                self._report_down(f"cannot connect to {self.broker}: {describe(exc)}")
            else:
                while not self._closing.is_set():
                    if self.client.loop(timeout=1.0) != paho.MQTT_ERR_SUCCESS:
                        break
                # paho would publish these again after reconnecting; the pipeline decides instead (not
                # in on_disconnect: paho may be iterating over them right then)
                self.client.drop_out_messages()
                if self._connected_at:
                    # connected, then lost: at once after a connection that lasted, and quickly after
                    # one the broker closed at once (a poison event, a kick), without a storm
                    lasted = time.monotonic() - self._connected_at >= self.stable_after
                    cap = self.quick_retry_max
                    delay = self.backoff[0] if lasted else min(delay, cap)
                self._connected_at = 0.0
            if self._closing.wait(delay):
                break
            delay = min(delay * 2, cap)

    def _on_connect(
        self, client: paho.Client, _userdata: object, _flags: object, reason: ReasonCode, _props: object
    ) -> None:
        if reason.is_failure:
            self._report_down(f"{self.broker} refused the connection: {reason}")
            return
        self._connected_at = time.monotonic()
        client.subscribe(self.command_filter, qos=1)

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        _mid: int,
        reason_codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("the broker refused our subscription to %s: check its ACL", self.command_filter)
            return
        self._call(self._subscribed)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: object, _flags: object, reason: ReasonCode, _props: object
    ) -> None:
        self._report_down(f"lost {self.broker}: {reason}")

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        ack: Callable[[], object] = partial(self.client.ack, msg.mid, msg.qos) if msg.qos else _nothing
        self._incoming.append(Command(msg.topic, bytes(msg.payload), bool(msg.retain), ack))
        self._schedule()

    def _on_publish(
        self, _client: paho.Client, _userdata: object, mid: int, _reason: object, _props: object
    ) -> None:
        self._acked.append(mid)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._hand_over)

    def _call(self, fn: Callable[[], None]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _report_down(self, error: str) -> None:
        self._call(partial(self._down, error))

    # --- on the event loop -----------------------------------------------------------

    def _hand_over(self) -> None:
        self._scheduled = False
        incoming, self._incoming = self._incoming, []
        acked, pending = self._acked, self._pending
        while acked:
            future = pending.pop(acked.popleft(), None)
            if future is not None and not future.done():
                future.set_result(None)
        if incoming and self._listener is not None:
            self._listener.received(incoming)

    def _subscribed(self) -> None:
        self._up = True
        assert self._listener is not None
        self._listener.connected()

    def _down(self, error: str) -> None:
        self._hand_over()  # what arrived before the loss counts
        self._up = False
        self._fail_pending(error)
        if self._listener is not None:
            self._listener.disconnected(error)

    def _fail_pending(self, error: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Disconnected(error))


def _nothing() -> None:
    pass
