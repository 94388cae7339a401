"""The embedded MQTT broker (amqtt 0.12.1) and what our embedding adds to it.

amqtt reads with a timeout of the client's keepalive but does nothing when it
expires (upstream issue #308), so a client that stops answering without
closing its socket (SIGSTOP, power loss) would never get its will published.
`KeepaliveWatchdog` closes such connections after 1.5 times the keepalive, as
MQTT 3.1.1 (section 3.1.2.10) and Mosquitto do; amqtt then publishes the will.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from . import passwords
from .limits import OncePer, RateLimiter
from .topics import BRIDGE_ACCOUNT, Topics

log = logging.getLogger(__name__)

KEEPALIVE_FACTOR = 1.5
WATCH_INTERVAL = 0.2


class BrokerStartError(Exception):
    """The embedded broker cannot start as asked (port taken, password file unusable)."""


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


class PasswordFileAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Accounts from a Mosquitto password file (re-read when it changes), plus the bridge's own
    per-process account. Refuses a connection whose last will aims at a topic its user may not
    publish to: amqtt would otherwise publish such a will unchecked."""

    @dataclass
    class Config:
        password_file: str = ""
        internal_user: str = ""
        internal_secret: str = ""
        prefix: str = "chat/v1"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._path = Path(self.config.password_file)
        self._rules = Topics(self.config.prefix)
        self._mtime = -1.0
        self._entries: dict[str, str] = {}

    def _accounts(self) -> dict[str, str]:
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                self._entries, self._mtime = passwords.read(self._path), mtime
        except (OSError, passwords.PasswordFileError) as exc:
            log.error("password file %s cannot be read (%s): refusing its accounts", self._path, exc)
            return {}
        return self._entries

    async def authenticate(self, *, session: Any) -> bool:
        user, password = session.username, session.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if not user:
            return False
        internal = self.config.internal_user
        if internal and user == internal and hmac.compare_digest(password, self.config.internal_secret):
            ok = True
        else:
            stored = self._accounts().get(user)
            ok = stored is not None and passwords.verify(password, stored)
        if not ok:
            log.warning("refused %r: unknown user or wrong password", user)
            return False
        if session.will_flag and not self._rules.allows(user, session.will_topic or "", "publish"):
            log.warning("refused %r: its last will targets %r", user, session.will_topic)
            return False
        return True


class TopicRulesPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """The topic rules of mosquitto/acl, for the embedded broker."""

    @dataclass
    class Config:
        prefix: str = "chat/v1"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._rules = Topics(self.config.prefix)

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        if session is None or topic is None:
            return False
        return self._rules.allows(session.username, topic, str(action))  # type: ignore[arg-type]


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
        self._commands = f"{self.config.prefix}/users/"
        self._warning = OncePer(60_000)  # one warning per flooding user per minute

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        user = self._command_user(topic) if action == Action.PUBLISH and topic else None
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

    def _command_user(self, topic: str) -> str | None:
        """The user of a command topic (counted per user, as the bridge counts), else None."""
        if not topic.startswith(self._commands):
            return None
        user, _, rest = topic[len(self._commands) :].partition("/")
        return user if user and rest.startswith("commands/") else None


class EmbeddedBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with two corrections for retained messages.

    On every connect amqtt replays the retained messages of *every* client's
    subscriptions to the new client (broker.py, `_handle_client_session`), and it
    never asks the topic plugins whether a client may read a retained message.
    We send a client only the retained messages of its own subscriptions that it
    may read.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(
                session, topic, Action.RECEIVE
            ):
                publish = handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
                sends.append(asyncio.ensure_future(publish))
        if sends:
            await asyncio.wait(sends)


class InProcessPublisher:
    """Hands the bridge's events straight to the embedded broker, skipping MQTT between the two.

    Through a client connection each event cost a paho publish, a PUBACK to decode and amqtt's whole
    inbound path; this puts it on amqtt's broadcast queue, which applies the same per-subscriber topic
    rules (`Action.RECEIVE`). Called from the bridge's worker thread; returns, per batch, a future that
    completes once amqtt has taken every event (the broker and the bridge share one process, so that
    is as far as an acknowledgement goes).
    """

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.broker = broker
        self.loop = loop

    def __call__(self, events: list[tuple[str, bytes, bool]]) -> concurrent.futures.Future[None]:
        return asyncio.run_coroutine_threadsafe(self._publish(events), self.loop)

    def ephemeral(self, events: list[tuple[str, bytes]]) -> concurrent.futures.Future[None]:
        """QoS 0 events (typing). Forced to QoS 0: amqtt otherwise delivers at the subscription's QoS,
        whatever the publish's, even a client's QoS 0 publish."""
        return asyncio.run_coroutine_threadsafe(self._publish_qos0(events), self.loop)

    async def _publish_qos0(self, events: list[tuple[str, bytes]]) -> None:
        for topic, payload in events:
            await self.broker.internal_message_broadcast(topic, payload, 0)

    async def _publish(self, events: list[tuple[str, bytes, bool]]) -> None:
        for topic, payload, retain in events:
            if retain:
                await self.broker.retain_message(None, topic, payload, 1)
            await self.broker.internal_message_broadcast(topic, payload)


def check_port_free(host: str, port: int) -> None:
    """Fails fast, with what to do, when something else already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerStartError(
                    f"{host}:{port} is already in use (another MQTT broker, such as a local Mosquitto, "
                    f"may be running there). Either let the embedded broker listen elsewhere, e.g. "
                    f"`chat-bridge serve --listen 127.0.0.1:1884`, or use the running broker with "
                    f"`chat-bridge serve --broker-url mqtt://{host}:{port}`."
                ) from None
            raise BrokerStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


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
    security: Security | None = None,
    *,
    prefix: str = "chat/v1",
    guard: tuple[float, int] | None = None,
) -> dict[str, Any]:
    plugins: dict[str, Any] = {"bridge.broker.KeepaliveWatchdog": {}}
    if guard is not None:
        plugins["bridge.broker.FloodGuard"] = {"prefix": prefix, "rate": guard[0], "burst": guard[1]}
    if security is None:
        plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
    else:
        plugins["bridge.broker.PasswordFileAuth"] = {
            "password_file": str(security.password_file),
            "internal_user": security.internal_user,
            "internal_secret": security.internal_secret,
            "prefix": security.prefix,
        }
        plugins["bridge.broker.TopicRulesPlugin"] = {"prefix": security.prefix}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "timeout_disconnect_delay": 0,
        "plugins": plugins,
    }


async def start_broker(
    host: str,
    port: int,
    security: Security | None = None,
    *,
    prefix: str = "chat/v1",
    guard: tuple[float, int] | None = None,
) -> EmbeddedBroker:
    """Starts amqtt in the running event loop (it must be built inside one)."""
    check_port_free(host, port)
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
    broker = EmbeddedBroker(broker_config(host, port, security, prefix=prefix, guard=guard))
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        raise BrokerStartError(f"the embedded broker could not start on {host}:{port}: {exc}") from None
    log.info("embedded MQTT broker listening on %s:%d", host, port)
    return broker
