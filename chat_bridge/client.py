"""The Python SDK: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio).

    from chat_bridge.client import Client

    with Client("alice", port=1883) as chat:
        conv = chat.create_direct("bob")
        chat.send_message(conv["conversation_id"], "hi")

Both follow the protocol's session rules for you: client ids (`{user}:{random}`, or
`{user}:{device}` with a persistent session), a new session id and last will for every MQTT
connection, `connect` again when the bridge restarts, answers matched by `request_id` with a timeout,
`error` answers raised as `chat_bridge.errors` exceptions, duplicates dropped by `event_id`, and
catch-up (`get-messages` since the last `rev` or `seq` seen) after a reconnect.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from . import _commands as commands
from ._session import ChatSession, Cursor, Mqtt, Options, client_id_for, paho_client
from .aio import AsyncClient
from .types import (
    Conversation,
    Event,
    Message,
    Page,
    ReactionChange,
    ReadMarker,
    SearchResults,
    Session,
    User,
)

__all__ = ["AsyncClient", "Client", "Cursor", "Event", "client_id_for"]

T = TypeVar("T")
Handler = Callable[[Event], Any]
BACKLOG = 10_000
log = logging.getLogger("chat_bridge.client")


class Client:
    """A chat user's connection to the bridge, for scripts, bots and threads.

    Handlers registered with `on()` run one at a time on the client's own dispatch thread (never on
    the network thread), so they may call the client's methods. `events()` and `wait_for()` read the
    same events from a backlog of the newest 10,000.
    """

    def __init__(
        self,
        user: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        device: str | None = None,
        password: str | None = None,
        username: str | None = None,
        tls: ssl.SSLContext | bool = False,
        prefix: str = "chat/v1",
        keepalive: int = 30,
        display_name: str | None = None,
        timeout: float = 10.0,
        catch_up: bool = True,
        transport: str = "tcp",
        ws_path: str = "/mqtt",
        fallbacks: Sequence[str] = (),
        _mqtt_factory: Callable[..., Mqtt] = paho_client,
    ) -> None:
        options = Options(
            host,
            port,
            device,
            username,
            password,
            tls,
            prefix,
            keepalive,
            display_name,
            timeout,
            catch_up,
            transport,
            ws_path,
            tuple(fallbacks),
        )
        self._handlers: list[tuple[str | None, Handler]] = []
        self._dispatch: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._backlog: deque[Event] = deque(maxlen=BACKLOG)
        self._arrived = threading.Condition()
        self._session = ChatSession(user, options, self._on_event, _mqtt_factory)
        self._dispatcher = threading.Thread(target=self._run_handlers, daemon=True, name=f"chat-{user}")
        self._closed = threading.Event()

    # -- connection -------------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._session.user

    @property
    def client_id(self) -> str:
        return self._session.client_id

    @property
    def session_id(self) -> str:
        """This MQTT connection's session id (a new one after every reconnect)."""
        return self._session.session_id

    @property
    def session(self) -> Session | None:
        """The newest `connected` answer."""
        return self._session.session

    @property
    def cursors(self) -> dict[str, Cursor]:
        """Per conversation, the newest seq and rev this client has seen."""
        return self._session.cursors

    def connect(self, timeout: float | None = None) -> Session:
        """Connects and announces the session; raises ConnectionFailed when that fails."""
        if not self._dispatcher.is_alive():
            self._dispatcher.start()
        return self._session.start(self._session.options.timeout if timeout is None else timeout)

    def close(self) -> None:
        """Ends the session (`disconnect`) and the connection."""
        self._session.close()
        self._closed.set()
        self._dispatch.put(None)
        with self._arrived:
            self._arrived.notify_all()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    # -- events -----------------------------------------------------------------------------------

    def on(self, event_type: str | None = None, handler: Handler | None = None) -> Any:
        """Calls `handler(event)` for every event of `event_type` (every event when None).

        Usable as a decorator: `@client.on("message-added")`.
        """

        def register(fn: Handler) -> Handler:
            self._handlers.append((event_type, fn))
            return fn

        return register(handler) if handler is not None else register

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yields events as they arrive; stops after `timeout` seconds without one, or on close."""
        while True:
            event = self._take(lambda _e: True, timeout)
            if event is None:
                return
            yield event

    def wait_for(
        self,
        event_type: str | None = None,
        match: Callable[[Event], bool] | None = None,
        timeout: float | None = None,
    ) -> Event:
        """Takes the first event (from the backlog, or the next to arrive) of that type that matches."""
        limit = self._session.options.timeout if timeout is None else timeout

        def wanted(e: Event) -> bool:
            return (event_type is None or e.type == event_type) and (match is None or match(e))

        event = self._take(wanted, limit)
        if event is None:
            raise TimeoutError(f"{self.user}: no {event_type or 'matching'} event within {limit:g} s")
        return event

    def run_forever(self) -> None:
        """Blocks until `close()` (or Ctrl-C, which closes), while handlers run."""
        try:
            while not self._closed.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.close()

    def _take(self, wanted: Callable[[Event], bool], timeout: float | None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while True:
                for event in self._backlog:
                    if wanted(event):
                        self._backlog.remove(event)
                        return event
                if self._closed.is_set():
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._arrived.wait(left)

    def _on_event(self, event: Event) -> None:
        with self._arrived:
            self._backlog.append(event)
            self._arrived.notify_all()
        if self._handlers:
            self._dispatch.put(event)

    def _run_handlers(self) -> None:
        while (event := self._dispatch.get()) is not None:
            for wanted, handler in list(self._handlers):
                if wanted is None or wanted == event.type:
                    try:
                        handler(event)
                    except Exception:
                        log.exception("%s: the handler for %s failed", self.user, event.type)

    # -- commands ---------------------------------------------------------------------------------

    def _call(self, call: commands.Call[T], timeout: float | None) -> T:
        return self._session.call(call, timeout)

    def create_direct(self, user_id: str, *, timeout: float | None = None) -> Conversation:
        """The direct conversation with `user_id` (the existing one if there is one)."""
        return self._call(commands.create_conversation("direct", [user_id], None), timeout)

    def create_group(
        self, participants: list[str], title: str | None = None, *, timeout: float | None = None
    ) -> Conversation:
        return self._call(commands.create_conversation("group", participants, title), timeout)

    def invite(self, conversation_id: str, user_ids: list[str], *, timeout: float | None = None) -> list[str]:
        return self._call(commands.invite(conversation_id, user_ids), timeout)

    def leave(self, conversation_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._call(commands.leave(conversation_id), timeout)

    def remove_conversation(self, conversation_id: str, *, timeout: float | None = None) -> str:
        return self._call(commands.remove_conversation(conversation_id), timeout)

    def send_message(
        self,
        conversation_id: str,
        body: str,
        *,
        client_msg_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        return self._call(commands.send_message(conversation_id, body, client_msg_id), timeout)

    def reply(
        self, message_id: str, body: str, *, client_msg_id: str | None = None, timeout: float | None = None
    ) -> Message:
        return self._call(commands.reply(message_id, body, client_msg_id), timeout)

    def get_messages(
        self,
        conversation_id: str,
        *,
        since_seq: int | None = None,
        since: str | None = None,
        since_rev: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page:
        return self._call(commands.get_messages(conversation_id, since_seq, since, since_rev, limit), timeout)

    def get_prior_messages(
        self,
        conversation_id: str,
        *,
        before_seq: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page:
        return self._call(commands.get_prior_messages(conversation_id, before_seq, limit), timeout)

    def get_conversations(self, *, timeout: float | None = None) -> list[Conversation]:
        """Every conversation of the user (following the pages of a paged answer)."""
        return self._all(commands.get_conversations, (), timeout)

    def get_participants(self, conversation_id: str, *, timeout: float | None = None) -> list[User]:
        return self._all(commands.get_participants, (conversation_id,), timeout)

    def get_active_users(self, *, timeout: float | None = None) -> list[User]:
        return self._all(commands.get_active_users, (), timeout)

    def _all(
        self, make: Callable[..., commands.Call[dict[str, Any]]], args: tuple[str, ...], timeout: float | None
    ) -> list[Any]:
        items: list[Any] = []
        after: str | None = None
        while True:
            call = make(*args, after)
            page, after = commands.page_items(call, self._call(call, timeout))
            items += page
            if after is None:
                return items

    def mark_read(self, conversation_id: str, seq: int, *, timeout: float | None = None) -> ReadMarker:
        return self._call(commands.mark_read(conversation_id, seq), timeout)

    def typing(self, conversation_id: str, typing: bool = True) -> None:
        """Not answered when it succeeds; a refusal arrives as an `error` event."""
        self._session.send("typing", {"conversation_id": conversation_id, "typing": typing})

    def edit_message(self, message_id: str, body: str, *, timeout: float | None = None) -> Message:
        return self._call(commands.edit_message(message_id, body), timeout)

    def delete_message(self, message_id: str, *, timeout: float | None = None) -> Message:
        return self._call(commands.delete_message(message_id), timeout)

    def react(
        self, message_id: str, emoji: str, on: bool = True, *, timeout: float | None = None
    ) -> ReactionChange:
        return self._call(commands.react(message_id, emoji, on), timeout)

    def search_messages(
        self,
        query: str,
        *,
        conversation_id: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> SearchResults:
        return self._call(commands.search_messages(query, conversation_id, limit), timeout)
