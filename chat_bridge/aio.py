"""The asyncio face of the SDK: the same session rules as `Client`, awaitable.

async with AsyncClient("alice", port=1883) as chat:
    async for event in chat.events():
        ...
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from . import _commands as commands
from ._session import ChatSession, Cursor, Mqtt, Options, paho_client
from .errors import RequestTimeout
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

T = TypeVar("T")
Handler = Callable[[Event], Any]
log = logging.getLogger("chat_bridge.client")


class AsyncClient:
    """A chat user's connection to the bridge, for asyncio programs.

    Create it inside the running loop. Handlers registered with `on()` may be plain functions or
    coroutine functions (run as tasks); `events()` is an async iterator over everything that arrives.
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
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._handlers: list[tuple[str | None, Handler]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session = ChatSession(user, options, self._from_thread, _mqtt_factory)

    @property
    def user(self) -> str:
        return self._session.user

    @property
    def client_id(self) -> str:
        return self._session.client_id

    @property
    def session_id(self) -> str:
        return self._session.session_id

    @property
    def session(self) -> Session | None:
        return self._session.session

    @property
    def cursors(self) -> dict[str, Cursor]:
        return self._session.cursors

    async def connect(self, timeout: float | None = None) -> Session:
        limit = self._session.options.timeout if timeout is None else timeout
        return await asyncio.to_thread(self._session.start, limit)

    async def close(self) -> None:
        await asyncio.to_thread(self._session.close)
        self._queue.put_nowait(None)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- events -----------------------------------------------------------------------------------

    def on(self, event_type: str | None = None, handler: Handler | None = None) -> Any:
        """Calls `handler(event)` (awaited as a task if it is a coroutine function) for each event."""

        def register(fn: Handler) -> Handler:
            self._handlers.append((event_type, fn))
            return fn

        return register(handler) if handler is not None else register

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in arrival order, until `close()`."""
        while (event := await self._queue.get()) is not None:
            yield event

    async def wait_for(
        self,
        event_type: str | None = None,
        match: Callable[[Event], bool] | None = None,
        timeout: float | None = None,
    ) -> Event:
        """The next event of that type that matches (events skipped meanwhile are consumed)."""
        limit = self._session.options.timeout if timeout is None else timeout

        async def first() -> Event:
            while True:
                event = await self._queue.get()
                if event is None:
                    raise TimeoutError(f"{self.user}: closed")
                if (event_type is None or event.type == event_type) and (match is None or match(event)):
                    return event

        return await asyncio.wait_for(first(), limit)

    def _from_thread(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: Event) -> None:
        self._queue.put_nowait(event)
        for wanted, handler in list(self._handlers):
            if wanted is not None and wanted != event.type:
                continue
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
            except Exception:
                log.exception("%s: the handler for %s failed", self.user, event.type)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: a handler failed", self.user, exc_info=task.exception())

    # -- commands ---------------------------------------------------------------------------------

    async def _call(self, call: commands.Call[T], timeout: float | None) -> T:
        limit = self._session.options.timeout if timeout is None else timeout
        rid, future = self._session.request(call)
        try:
            event = await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except TimeoutError:
            self._session.forget(rid)
            raise RequestTimeout(call.command, rid, limit) from None
        return call.read(event.data)

    async def create_direct(self, user_id: str, *, timeout: float | None = None) -> Conversation:
        return await self._call(commands.create_conversation("direct", [user_id], None), timeout)

    async def create_group(
        self, participants: list[str], title: str | None = None, *, timeout: float | None = None
    ) -> Conversation:
        return await self._call(commands.create_conversation("group", participants, title), timeout)

    async def invite(
        self, conversation_id: str, user_ids: list[str], *, timeout: float | None = None
    ) -> list[str]:
        return await self._call(commands.invite(conversation_id, user_ids), timeout)

    async def leave(self, conversation_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        return await self._call(commands.leave(conversation_id), timeout)

    async def remove_conversation(self, conversation_id: str, *, timeout: float | None = None) -> str:
        return await self._call(commands.remove_conversation(conversation_id), timeout)

    async def send_message(
        self,
        conversation_id: str,
        body: str,
        *,
        client_msg_id: str | None = None,
        timeout: float | None = None,
    ) -> Message:
        return await self._call(commands.send_message(conversation_id, body, client_msg_id), timeout)

    async def reply(
        self, message_id: str, body: str, *, client_msg_id: str | None = None, timeout: float | None = None
    ) -> Message:
        return await self._call(commands.reply(message_id, body, client_msg_id), timeout)

    async def get_messages(
        self,
        conversation_id: str,
        *,
        since_seq: int | None = None,
        since: str | None = None,
        since_rev: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page:
        return await self._call(
            commands.get_messages(conversation_id, since_seq, since, since_rev, limit), timeout
        )

    async def get_prior_messages(
        self,
        conversation_id: str,
        *,
        before_seq: int | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page:
        return await self._call(commands.get_prior_messages(conversation_id, before_seq, limit), timeout)

    async def get_conversations(self, *, timeout: float | None = None) -> list[Conversation]:
        """Every conversation of the user (following the pages of a paged answer)."""
        return await self._all(commands.get_conversations, (), timeout)

    async def get_participants(self, conversation_id: str, *, timeout: float | None = None) -> list[User]:
        return await self._all(commands.get_participants, (conversation_id,), timeout)

    async def get_active_users(self, *, timeout: float | None = None) -> list[User]:
        return await self._all(commands.get_active_users, (), timeout)

    async def _all(
        self, make: Callable[..., commands.Call[dict[str, Any]]], args: tuple[str, ...], timeout: float | None
    ) -> list[Any]:
        items: list[Any] = []
        after: str | None = None
        while True:
            call = make(*args, after)
            page, after = commands.page_items(call, await self._call(call, timeout))
            items += page
            if after is None:
                return items

    async def mark_read(self, conversation_id: str, seq: int, *, timeout: float | None = None) -> ReadMarker:
        return await self._call(commands.mark_read(conversation_id, seq), timeout)

    async def typing(self, conversation_id: str, typing: bool = True) -> None:
        self._session.send("typing", {"conversation_id": conversation_id, "typing": typing})

    async def edit_message(self, message_id: str, body: str, *, timeout: float | None = None) -> Message:
        return await self._call(commands.edit_message(message_id, body), timeout)

    async def delete_message(self, message_id: str, *, timeout: float | None = None) -> Message:
        return await self._call(commands.delete_message(message_id), timeout)

    async def react(
        self, message_id: str, emoji: str, on: bool = True, *, timeout: float | None = None
    ) -> ReactionChange:
        return await self._call(commands.react(message_id, emoji, on), timeout)

    async def search_messages(
        self,
        query: str,
        *,
        conversation_id: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> SearchResults:
        return await self._call(commands.search_messages(query, conversation_id, limit), timeout)
