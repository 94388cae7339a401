"""The protocol's session rules over one paho client, shared by the sync and the asyncio face.

Threads: paho's network thread runs the callbacks here and never blocks; catch-up after a reconnect
runs in a short-lived worker thread (it waits for answers, which arrive on the network thread).
Events leave through `deliver`, called from either thread; the faces hand them to the user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from . import _commands as commands
from ._paho import OrderedClient
from .errors import ChatBridgeError, ConnectionFailed, InternalError, RateLimited, RequestTimeout, error_from
from .types import Conversation, Event, Message, Session

log = logging.getLogger("chat_bridge.client")

T = TypeVar("T")

USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEVICE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEDUP_WINDOW = 4096
CATCH_UP_PAGE = 500
CATCH_UP_LONGEST_WAIT = 30.0  # seconds; a `rate-limited` page is asked again after its retry_after
CATCH_UP_INTERNAL_RETRIES = 5
# CONNACK codes after which retrying cannot help (MQTT 3.1.1: bad credentials, not authorised)
REFUSALS = ("Bad user name or password", "Not authorized", "Client identifier not valid")


def client_id_for(user: str, device: str | None) -> str:
    """`{user}:{device}` for a persistent session, `{user}:{random}` for an ephemeral one."""
    if not USER_ID.fullmatch(user) or user == "chat-bridge":
        raise ValueError(f"a user id is 1-64 of A-Z a-z 0-9 _ - (and not chat-bridge), not {user!r}")
    if device is not None and not DEVICE.fullmatch(device):
        raise ValueError(f"a device name is 1-64 of A-Z a-z 0-9 _ . -, not {device!r}")
    return f"{user}:{device if device is not None else secrets.token_hex(6)}"


class Mqtt(Protocol):
    """The part of paho's Client the session uses (a fake stands in for it in unit tests)."""

    on_pre_connect: Any
    on_connect: Any
    on_disconnect: Any
    on_subscribe: Any
    on_message: Any
    on_socket_open: Any
    on_connect_fail: Any

    def will_set(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> None: ...
    def username_pw_set(self, username: str | None, password: str | None = ...) -> None: ...
    def tls_set_context(self, context: ssl.SSLContext | None = ...) -> None: ...
    def ws_set_options(self, path: str = ...) -> None: ...
    def move_to(self, host: str, port: int) -> None: ...
    def reconnect_delay_set(self, min_delay: int = ..., max_delay: int = ...) -> None: ...
    def connect_async(self, host: str, port: int = ..., keepalive: int = ...) -> Any: ...
    def loop_start(self) -> Any: ...
    def loop_stop(self) -> Any: ...
    def subscribe(self, topic: Any, qos: int = ...) -> Any: ...
    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Any: ...
    def disconnect(self) -> Any: ...


def paho_client(client_id: str, clean_session: bool, transport: str = "tcp") -> Mqtt:
    return cast(
        Mqtt,
        OrderedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            transport=transport,
        ),
    )


@dataclass
class Cursor:
    """The newest message (seq) and change (rev) seen in a conversation."""

    seq: int = 0
    rev: int = 0


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 1883
    device: str | None = None
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | bool = False
    prefix: str = "chat/v1"
    keepalive: int = 30
    display_name: str | None = None
    timeout: float = 10.0
    catch_up: bool = True
    transport: str = "tcp"  # or "websockets": MQTT over WebSockets at ws_path (subprotocol mqtt)
    ws_path: str = "/mqtt"
    # "host:port" of other brokers of the same cluster (a NATS cluster's other MQTT listeners): when
    # a connection attempt fails or the connection is lost, the next one is tried, in turn
    fallbacks: tuple[str, ...] = ()


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a broker address is host:port, not {text!r}")
    return host.strip("[]"), int(port)


class _Pending:
    __slots__ = ("command", "future", "internal")

    def __init__(self, command: str, internal: bool) -> None:
        self.command = command
        self.future: Future[Event] = Future()
        self.internal = internal


class ChatSession:
    def __init__(
        self,
        user: str,
        options: Options,
        deliver: Callable[[Event], None],
        mqtt_factory: Callable[..., Mqtt] = paho_client,
    ) -> None:
        if options.transport not in ("tcp", "websockets"):
            raise ValueError(f"transport is 'tcp' or 'websockets', not {options.transport!r}")
        self.user = user
        self.options = options
        self.addresses = [(options.host, options.port), *(parse_address(a) for a in options.fallbacks)]
        self._at = 0  # the address connected to, or tried next
        self.client_id = client_id_for(user, options.device)
        self._deliver = deliver
        base = f"{options.prefix}/users/{user}"
        self.command_topic = base + "/commands/"
        self.inbox_topic = base + "/inbox"
        self.status_topic = f"{options.prefix}/bridge/status"
        self.session_id = ""
        self.epoch: str | None = None
        self.connections = 0  # MQTT connections made so far
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._revs: OrderedDict[str, int] = OrderedDict()  # message_id -> newest rev delivered
        self.cursors: dict[str, Cursor] = {}
        self._snapshot: dict[str, Cursor] | None = None  # set on a reconnect, consumed by its `connected`
        self._rid_prefix = secrets.token_hex(3)
        self._counter = 0
        self._ready = threading.Event()  # the current session's `connected` arrived
        self._failure: str | None = None
        self._connect_error: str | None = None
        self._closed = False
        self._status: dict[str, Any] | None = None  # the last retained bridge status seen
        self._closing = threading.Event()  # wakes a catch-up waiting out a `rate-limited` answer
        self.session: Session | None = None

        if options.transport == "websockets":
            mqtt = mqtt_factory(self.client_id, options.device is None, transport="websockets")
            mqtt.ws_set_options(path=options.ws_path)
        else:
            mqtt = mqtt_factory(self.client_id, options.device is None)
        if options.password is not None or options.username is not None:
            mqtt.username_pw_set(options.username or user, options.password)
        if options.tls:
            mqtt.tls_set_context(options.tls if isinstance(options.tls, ssl.SSLContext) else None)
        mqtt.reconnect_delay_set(1, 30)
        mqtt.on_pre_connect = self._on_pre_connect
        mqtt.on_connect = self._on_connect
        mqtt.on_disconnect = self._on_disconnect
        mqtt.on_subscribe = self._on_subscribe
        mqtt.on_message = self._on_message
        mqtt.on_socket_open = _no_delay
        mqtt.on_connect_fail = self._on_connect_fail
        self.mqtt = mqtt

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float) -> Session:
        """Connects, and returns when the bridge has answered our `connect`."""
        self.mqtt.connect_async(self.options.host, self.options.port, self.options.keepalive)
        self.mqtt.loop_start()
        if not self._ready.wait(timeout) or self._failure or self.session is None:
            reason = (
                self._failure
                or (self._connect_error if self.connections == 0 and self._connect_error else None)
                or f"no answer to connect within {timeout:g} s ({self._no_answer_hint()})"
            )
            self.close(announce=False)
            tried = ", ".join(f"{h}:{p}" for h, p in self.addresses)
            raise ConnectionFailed(f"{self.user}@{tried}: {reason}")
        return self.session

    def close(self, announce: bool = True) -> None:
        """Says goodbye (`disconnect`, so no will is needed) and stops the network thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if announce and self._ready.is_set():
            info = self._publish("disconnect", {"session_id": self.session_id, "reason": "client"})
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionFailed("the client was closed"))

    # -- requests ---------------------------------------------------------------------------------

    def request(self, call: commands.Call[Any], internal: bool = False) -> tuple[str, Future[Event]]:
        with self._lock:
            self._counter += 1
            rid = f"{self._rid_prefix}-{self._counter}"
            pending = _Pending(call.command, internal)
            self._pending[rid] = pending
        if self._closed:
            pending.future.set_exception(ConnectionFailed("the client is closed"))
        else:
            self._publish(call.command, {**call.fields, "request_id": rid})
        return rid, pending.future

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def call(self, call: commands.Call[T], timeout: float | None = None) -> T:
        """Sends a command and waits for its answer (the blocking way)."""
        limit = self.options.timeout if timeout is None else timeout
        rid, future = self.request(call)
        try:
            event = future.result(limit)
        except TimeoutError:
            self.forget(rid)
            raise RequestTimeout(call.command, rid, limit) from None
        return call.read(event.data)

    def send(self, command: str, fields: dict[str, Any]) -> None:
        """Publishes a command whose success is not answered (typing); an error still arrives as an event."""
        with self._lock:
            self._counter += 1
            rid = f"{self._rid_prefix}-{self._counter}"
        self._publish(command, {**fields, "request_id": rid})

    def _publish(self, command: str, fields: dict[str, Any]) -> Any:
        return self.mqtt.publish(self.command_topic + command, json.dumps(fields).encode(), qos=1)

    # -- paho callbacks (network thread) -----------------------------------------------------------

    def _on_pre_connect(self, *_: Any) -> None:
        # A new session and a will that names it, for every MQTT connection: a will left over from an
        # older connection must not end this one.
        self._ready.clear()
        self.session_id = secrets.token_hex(8)
        will = json.dumps({"session_id": self.session_id, "reason": "lost"}).encode()
        self.mqtt.will_set(self.command_topic + "disconnect", will, qos=1, retain=False)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            text = str(reason)
            log.warning("%s: the broker refused the connection: %s", self.client_id, text)
            if any(r.lower() in text.lower() for r in REFUSALS):
                self._failure = f"the broker refused the connection: {text}"
                self._ready.set()
            return
        self.connections += 1
        if self.connections > 1:
            # what we had seen when the last connection ended: catch-up fetches everything after it
            with self._lock:
                self._snapshot = {cid: Cursor(c.seq, c.rev) for cid, c in self.cursors.items()}
        self.mqtt.subscribe([(self.inbox_topic, 1), (self.status_topic, 1)])

    def _on_connect_fail(self, *_: Any) -> None:
        self._connect_error = "the broker cannot be reached (connection failed)"
        self._next_address()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any = None, _props: Any = None) -> None:
        self._ready.clear()
        if not self._closed:  # paho reconnects by itself; tell the application meanwhile
            self._next_address()
            self.deliver(Event("connection-lost", {"reason": str(reason)}))

    def _next_address(self) -> None:
        """The next reconnection goes to the next broker of the cluster (this one may be gone)."""
        if len(self.addresses) < 2:
            return
        self._at = (self._at + 1) % len(self.addresses)
        host, port = self.addresses[self._at]
        log.info("%s: connecting to %s:%d next", self.client_id, host, port)
        self.mqtt.move_to(host, port)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reasons: Any = (), _props: Any = None) -> None:
        if any(getattr(r, "is_failure", False) for r in reasons or ()):
            # refused (a NATS node that lost a peer could not create the subscription's consumer):
            # without the inbox no answer would ever arrive, so ask again, not `connect`
            self._subscribe_retry = min(getattr(self, "_subscribe_retry", 0.25) * 2, 5.0)
            log.warning(
                "%s: the broker refused a subscription (%s); again in %.1fs",
                self.client_id,
                ", ".join(str(r) for r in reasons),
                self._subscribe_retry,
            )
            timer = threading.Timer(self._subscribe_retry, self._resubscribe)
            timer.daemon = True
            timer.start()
            return
        self._subscribe_retry = 0.25
        self._announce()

    def _resubscribe(self) -> None:
        if not self._closed:  # (disconnected meanwhile: paho refuses it; on_connect subscribes anyway)
            self.mqtt.subscribe([(self.inbox_topic, 1), (self.status_topic, 1)])

    def _announce(self) -> None:
        _rid, future = self.request(commands.connect(self.session_id, self.options.display_name))
        session_id = self.session_id
        future.add_done_callback(lambda f: self._on_connected(f, session_id))

    def _on_connected(self, future: Future[Event], session_id: str) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        session = cast(Session, dict(future.result().data))
        with self._lock:
            snapshot, self._snapshot = self._snapshot, None
        # the rest needs answers, which arrive on this (the network) thread: not here
        threading.Thread(
            target=self._after_connected,
            args=(session, session_id, snapshot),
            name=f"chat-bridge-catch-up-{self.client_id}",
            daemon=True,
        ).start()

    def _after_connected(self, session: Session, session_id: str, snapshot: dict[str, Cursor] | None) -> None:
        conversations = list(session.get("conversations", []))
        after = cast(dict[str, Any], session).get("conversations_next")
        complete = True
        try:  # a bridge that pages `connected` sends the first page of conversations only
            while isinstance(after, str) and after:
                call = commands.get_conversations(after)
                page, after = commands.page_items(call, self._wait(call))
                conversations += page
        except ChatBridgeError as exc:
            log.warning("%s: could not list all conversations: %s", self.client_id, exc)
            complete = False
        session["conversations"] = conversations
        first, self.session = self.session is None, session
        if first:  # where a first connection starts from: the newest state the bridge has
            for conv in conversations:
                cursor = self.cursors.setdefault(conv["conversation_id"], Cursor())
                cursor.seq = max(cursor.seq, conv["last_seq"])
                cursor.rev = max(cursor.rev, conv.get("last_rev", 0))
        if session_id == self.session_id:
            self._ready.set()
        if snapshot is not None and not first and complete and self.options.catch_up:
            self._catch_up(conversations, snapshot)

    def _wait(self, call: commands.Call[T]) -> T:
        """An internal request (its answer is not delivered as an event), waited for."""
        rid, future = self.request(call, internal=True)
        try:
            return call.read(future.result(self.options.timeout).data)
        except TimeoutError:
            self.forget(rid)
            raise RequestTimeout(call.command, rid, self.options.timeout) from None

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            log.warning("%s: dropped a payload that is not JSON on %s", self.client_id, msg.topic)
            return
        if not isinstance(body, dict):
            return
        if msg.topic == self.status_topic:
            self._on_status(body)
            return
        if msg.topic != self.inbox_topic or not isinstance(body.get("type"), str):
            return
        data = body.get("data")
        event = Event(
            type=body["type"],
            data=data if isinstance(data, dict) else {},
            request_id=body.get("request_id") if isinstance(body.get("request_id"), str) else None,
            event_id=body.get("event_id") if isinstance(body.get("event_id"), str) else None,
            ts=body.get("ts") if isinstance(body.get("ts"), str) else None,
        )
        if event.event_id is not None:
            with self._lock:
                if event.event_id in self._seen:
                    return  # QoS 1 delivered it again
                self._seen[event.event_id] = None
                if len(self._seen) > DEDUP_WINDOW:
                    self._seen.popitem(last=False)
        pending = None
        if event.request_id is not None:
            with self._lock:
                pending = self._pending.pop(event.request_id, None)
        if (pending is None or not pending.internal) and self._track(event):
            self.deliver(event)
        if pending is not None and not pending.future.done():
            if event.type == "error":
                pending.future.set_exception(error_from(event.data, event.request_id))
            else:
                pending.future.set_result(event)

    def _no_answer_hint(self) -> str:
        if self.connections == 0:
            return "the broker accepted no connection: is it running at that address?"
        if self._status is None:
            return (
                f"no bridge status on {self.status_topic}: is chat-bridge running on this broker, "
                f"with the topic prefix {self.options.prefix!r}?"
            )
        if self._status.get("status") != "online":
            return f"the bridge is {self._status.get('status')!r} (its status on {self.status_topic})"
        return (
            f"the bridge (epoch {self._status.get('epoch')}) is online but did not answer: is it overloaded?"
        )

    def _on_status(self, status: dict[str, Any]) -> None:
        self._status = status
        self.deliver(Event("bridge-status", status))
        epoch = status.get("epoch")
        if status.get("status") != "online" or not isinstance(epoch, str) or epoch == self.epoch:
            return
        previous, self.epoch = self.epoch, epoch
        if previous is not None:
            # a restarted bridge ends the sessions nobody re-announces within its grace period
            log.info("%s: the bridge restarted (epoch %s); announcing session again", self.client_id, epoch)
            self._announce()

    # -- what we have seen, and catching up on what we missed ---------------------------------------

    def _track(self, event: Event) -> bool:
        """Moves the cursors with live events and remembers which message revisions were delivered;
        false for a `message-added` that catch-up (or the broker's queue) has delivered already."""
        conv = event.conversation
        if event.type == "conversation-created" and conv is not None:
            cursor = Cursor(conv["last_seq"], conv.get("last_rev", 0))
            self.cursors.setdefault(conv["conversation_id"], cursor)
        elif event.type == "conversation-removed" and isinstance(event.data.get("conversation_id"), str):
            self.cursors.pop(event.data["conversation_id"], None)
        message = event.message
        if message is None or event.type == "connected":
            return True
        cursor = self.cursors.setdefault(message["conversation_id"], Cursor())
        cursor.seq = max(cursor.seq, message["seq"])
        cursor.rev = max(cursor.rev, message.get("rev", 0))
        return self._remember(message) or event.type != "message-added"

    def _remember(self, message: Message) -> bool:
        """True when this revision of the message was not delivered before."""
        rev = message.get("rev", 0)
        with self._lock:
            known = self._revs.get(message["message_id"])
            if known is not None and known >= rev:
                return False
            self._revs[message["message_id"]] = rev
            self._revs.move_to_end(message["message_id"])
            if len(self._revs) > DEDUP_WINDOW:
                self._revs.popitem(last=False)
        return True

    def _catch_up(self, conversations: list[Conversation], previous: dict[str, Cursor]) -> None:
        """After a reconnect: fetches, per conversation, what changed since the cursor, as events."""
        current = {c["conversation_id"] for c in conversations}
        for cid in set(previous) - current:
            self.cursors.pop(cid, None)
            self.deliver(Event("conversation-removed", {"conversation_id": cid}, catch_up=True))
        for conv in conversations:
            cid = conv["conversation_id"]
            cursor = previous.get(cid)
            if cursor is None:
                cursor = Cursor()
                self.deliver(Event("conversation-created", {"conversation": conv}, catch_up=True))
            by_rev = "last_rev" in conv
            if (by_rev and conv["last_rev"] <= cursor.rev) or (not by_rev and conv["last_seq"] <= cursor.seq):
                continue
            try:
                self._fetch_since(cid, cursor, by_rev)
            except Exception as exc:  # the next reconnect tries again; a live client must not die of it
                log.warning("%s: catch-up of %s failed: %s", self.client_id, cid, exc)
                return

    def _fetch_since(self, cid: str, cursor: Cursor, by_rev: bool) -> None:
        seen_seq = cursor.seq
        while not self._closed:
            call = commands.get_messages(
                cid,
                since_seq=None if by_rev else cursor.seq,
                since=None,
                since_rev=cursor.rev if by_rev else None,
                limit=CATCH_UP_PAGE,
            )
            page = self._wait_out_refusals(call)
            if page is None:
                return
            messages: list[Message] = page.get("messages", [])
            for m in messages:
                live = self.cursors.setdefault(cid, Cursor())
                live.seq = max(live.seq, m["seq"])
                live.rev = max(live.rev, m.get("rev", 0))
                cursor.seq, cursor.rev = max(cursor.seq, m["seq"]), max(cursor.rev, m.get("rev", 0))
                if self._remember(m):
                    kind = "message-added" if m["seq"] > seen_seq else "message-updated"
                    self.deliver(Event(kind, {"message": m}, catch_up=True))
            if not page.get("has_more") or not messages:
                return

    def _wait_out_refusals(self, call: commands.Call[T]) -> T | None:
        """Asks until answered: a `rate-limited` page (a user who missed much in several conversations
        runs into the cost budget) is asked again after its `retry_after`, an `internal` one after a
        growing pause (a few times). None when the client closed meanwhile."""
        failures = 0
        while not self._closed:
            try:
                return self._wait(call)
            except RateLimited as exc:
                pause = min(max(exc.retry_after, 0.05), CATCH_UP_LONGEST_WAIT)
                log.info(
                    "%s: catch-up page refused (rate-limited); asking again in %.1f s", self.client_id, pause
                )
            except InternalError:
                failures += 1
                if failures > CATCH_UP_INTERNAL_RETRIES:
                    raise
                pause = min(0.5 * 2**failures, CATCH_UP_LONGEST_WAIT)
            if self._closing.wait(pause):
                return None
        return None

    def deliver(self, event: Event) -> None:
        try:
            self._deliver(event)
        except Exception:
            log.exception("%s: an event handler failed", self.client_id)


def _no_delay(_c: Any, _u: Any, sock: Any) -> None:
    # paho leaves Nagle on: a command right after acknowledging a delivery could wait ~40 ms
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
