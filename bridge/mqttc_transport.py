"""The transport on the bridge's own asyncio MQTT client (bridge/mqtt_client.py).

Everything runs on the pipeline's event loop: no network thread, no hand-over
between threads. Commands from the command subscription arrive in the order the
broker sent them, one `received()` call per burst read from the socket, and are
acknowledged (PUBACK, in order) when the pipeline calls `Command.ack`. Events go
out at their QoS (1; 0 for typing, done once written). A publish's future is the
client's own (no wrapping): it fails with `Disconnected` when the connection drops
first (the client does not send it again by itself: the pipeline decides), and
with `EventRefused` when the event is larger than `max_packet_size` and so can
never be delivered as it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as ssl_module
from collections.abc import Callable, Sequence
from functools import partial

from . import mqtt_client as mc
from .config import BrokerAddress
from .mqtt_codec import MAX_REMAINING_LENGTH, SUBACK_FAILURE, PacketTooLarge
from .transport import Command, Disconnected, Event, EventRefused, Listener, TransportError

log = logging.getLogger(__name__)


class _Lost(mc.ConnectionLost, Disconnected):
    pass


class _NotConnected(mc.NotConnected, Disconnected):
    pass


class _TooLarge(PacketTooLarge, EventRefused):
    pass


class _Invalid(ValueError, EventRefused):
    pass


class _Client(mc.Client):
    publish_lost = _Lost
    publish_not_connected = _NotConnected
    publish_too_large = _TooLarge
    publish_invalid = _Invalid


def describe(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own strerror is "Connect call failed (host, port)"
    return str(exc) or type(exc).__name__


class MqttcTransport:
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
        window: int = 10_000,
        max_packet_size: int | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.broker = broker
        self.command_filter = command_filter
        self._listener: Listener | None = None
        self._subscribing: asyncio.Task[None] | None = None
        self.client = _Client(
            broker.host,
            broker.port,
            client_id=client_id,
            keepalive=keepalive,
            clean_session=False,
            will=mc.Will(will.topic, will.payload, 1, will.retain) if will is not None else None,
            username=broker.username,
            password=broker.password if broker.username else None,
            ssl=ssl,
            window=window,
            max_packet_size=max_packet_size or MAX_REMAINING_LENGTH + 5,
            reconnect_min=backoff[0],
            reconnect_max=backoff[1],
            resend_on_reconnect=False,
            on_messages=self._on_messages,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_connect_error=self._on_connect_error,
        )

    # --- Transport -------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        self._listener = listener
        self.client.start()

    def publish(self, event: Event) -> asyncio.Future[None]:
        return self.client.publish(event.topic, event.payload, event.qos, event.retain)

    def publish_then(self, event: Event, done: Callable[[BaseException | None], object]) -> None:
        """`publish` without a future: `done(None)` once the broker took it, `done(error)` when not."""
        self.client.publish_then(event.topic, event.payload, event.qos, event.retain, done)

    def resubscribe(self) -> None:
        self._subscribe()

    def reconnect(self) -> None:
        self.client.reconnect()

    async def close(self, farewell: Event | None = None) -> None:
        if farewell is not None and self.client.connected:
            try:
                await asyncio.wait_for(self.publish(farewell), timeout=5)
            except (TransportError, TimeoutError) as exc:
                log.warning("could not announce %r before stopping: %s", farewell.topic, exc)
        if self._subscribing is not None:
            self._subscribing.cancel()
        await self.client.stop()

    # --- the client's callbacks (on the loop) -----------------------------------

    def _on_messages(self, messages: list[mc.Message]) -> None:
        ack = self.client.ack
        commands = [Command(m.topic, m.payload, m.retain, partial(ack, m)) for m in messages]
        if self._listener is not None:
            self._listener.received(commands)

    def _on_connect(self, _session_present: bool) -> None:
        self._subscribe()

    def _subscribe(self) -> None:
        if self._subscribing is None or self._subscribing.done():
            self._subscribing = asyncio.get_running_loop().create_task(self._subscribe_now())

    async def _subscribe_now(self) -> None:
        try:
            codes: Sequence[int] = await self.client.subscribe([(self.command_filter, 1)])
        except mc.MqttError as exc:
            log.info(
                "subscribing to %s did not finish (%s); it is retried after the reconnect",
                self.command_filter,
                exc,
            )
            return
        if any(code == SUBACK_FAILURE for code in codes):
            log.error("the broker refused our subscription to %s: check its ACL", self.command_filter)
            return
        if self._listener is not None:
            self._listener.connected()

    def _on_disconnect(self, exc: BaseException | None) -> None:
        if self._listener is not None:
            self._listener.disconnected(
                f"lost {self.broker}: {describe(exc) if exc else 'connection closed'}"
            )

    def _on_connect_error(self, exc: BaseException) -> None:
        if self._listener is not None:
            self._listener.disconnected(f"cannot connect to {self.broker}: {describe(exc)}")
