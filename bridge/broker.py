"""The embedded MQTT broker (amqtt 0.12.1) and what our embedding adds to it.

amqtt reads with a timeout of the client's keepalive but does nothing when it
expires (upstream issue #308), so a client that stops answering without
closing its socket (SIGSTOP, power loss) would never get its will published.
`KeepaliveWatchdog` closes such connections after 1.5 times the keepalive, as
MQTT 3.1.1 (section 3.1.2.10) and Mosquitto do; amqtt then publishes the will.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin

log = logging.getLogger(__name__)

KEEPALIVE_FACTOR = 1.5
WATCH_INTERVAL = 0.2


class ListenError(Exception):
    """The embedded broker cannot listen where it was asked to."""


class KeepaliveWatchdog(BasePlugin[Any]):  # type: ignore[misc]
    """Disconnects clients silent for more than 1.5 x their keepalive, so their will fires."""

    @dataclass
    class Config:
        factor: float = KEEPALIVE_FACTOR
        interval: float = WATCH_INTERVAL

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._last_packet: dict[str, float] = {}
        # A connection is at least as old as the first time we saw its handler: that bounds a
        # reconnecting client's stale timestamp from its previous connection.
        self._first_seen: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def on_mqtt_packet_received(self, *, packet: Any, session: Any = None) -> None:
        if session is not None and session.client_id is not None:
            self._last_packet[session.client_id] = time.monotonic()

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Any = None) -> None:
        self._last_packet.pop(client_id, None)

    async def _watch(self) -> None:
        broker = self.context._broker_instance
        while True:
            await asyncio.sleep(self.config.interval)
            now = time.monotonic()
            for client_id, (session, handler) in list(broker.sessions.items()):
                if session.keep_alive <= 0 or handler is None or not session.transitions.is_connected():
                    continue
                since = max(self._last_packet.get(client_id, 0.0), self._first_seen.setdefault(handler, now))
                if now - since > self.config.factor * session.keep_alive:
                    log.info(
                        "client %s silent for %.1fs (keepalive %ss): closing it, its will fires",
                        client_id,
                        now - since,
                        session.keep_alive,
                    )
                    self._first_seen.pop(handler, None)
                    self._last_packet.pop(client_id, None)
                    await handler.handle_connection_closed()

    async def close(self) -> None:
        self._task.cancel()


class EmbeddedBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with one correction.

    On every connect amqtt replays the retained messages of *every* client's
    subscriptions to the new client (broker.py, `_handle_client_session`), so a
    client would receive presence and status messages it never subscribed to.
    We only send a client the retained messages of its own subscriptions.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter = subscription[0]
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


def check_port_free(host: str, port: int) -> None:
    """Fails fast, with what to do, when something else already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"{host}:{port} is already in use (another MQTT broker, such as a local Mosquitto, "
                    f"may be running there). Either let the embedded broker listen elsewhere, e.g. "
                    f"`chat-bridge serve --listen 127.0.0.1:1884`, or use the running broker with "
                    f"`chat-bridge serve --broker-url mqtt://{host}:{port}`."
                ) from None
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def broker_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "timeout_disconnect_delay": 0,
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "bridge.broker.KeepaliveWatchdog": {},
        },
    }


async def start_broker(host: str, port: int) -> EmbeddedBroker:
    """Starts amqtt in the running event loop (it must be built inside one)."""
    check_port_free(host, port)
    broker = EmbeddedBroker(broker_config(host, port))
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        raise ListenError(f"the embedded broker could not start on {host}:{port}: {exc}") from None
    log.info("embedded MQTT broker listening on %s:%d", host, port)
    return broker
