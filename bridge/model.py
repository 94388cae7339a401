"""Domain records and the storage interface the core depends on.

Records are plain frozen dataclasses with times as integer milliseconds since
the epoch; they know nothing of JSON, MQTT or SQL.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

GLOBAL_ID = "global"
Kind = Literal["global", "direct", "group", "thread"]
# emoji -> user ids in the order they reacted; emoji in the order they first appeared
Reactions = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    display_name: str | None
    created_ms: int


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    kind: Kind
    title: str | None
    owner_id: str | None
    parent_conversation_id: str | None
    parent_message_id: str | None
    created_ms: int
    last_seq: int = 0
    last_rev: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    conversation_id: str
    seq: int
    sender_id: str
    body: str
    client_msg_id: str | None
    created_ms: int
    rev: int = 0
    edited_ms: int | None = None
    deleted_ms: int | None = None
    reactions: Reactions = ()

    @property
    def deleted(self) -> bool:
        return self.deleted_ms is not None


def react(reactions: Reactions, emoji: str, user_id: str, on: bool) -> Reactions | None:
    """The reactions with the user's `emoji` added (at the end of its list) or removed; None when
    that changes nothing."""
    found = dict(reactions)
    users = found.get(emoji, ())
    if on == (user_id in users):
        return None
    if on:
        found[emoji] = (*users, user_id)
    else:
        rest = tuple(u for u in users if u != user_id)
        if rest:
            found[emoji] = rest
        else:
            del found[emoji]
    return tuple(found.items())


_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The words search matches on: runs of letters and digits, NFKC-normalized and case-folded.

    Both databases index the words joined by spaces, so they agree with each other and with the
    in-memory store on what a whole word is."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@dataclass(frozen=True, slots=True)
class ChatSession:
    """One MQTT connection of a user, as announced by `connect`."""

    user_id: str
    session_id: str
    epoch: str
    started_ms: int
    ended_ms: int | None = None

    @property
    def active(self) -> bool:
        return self.ended_ms is None


def direct_key(a: str, b: str) -> str:
    """The key that makes a direct conversation unique per pair of users."""
    low, high = sorted((a, b))
    return f"{low}/{high}"


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One serialized event for one destination, stored with the changes it reports."""

    kind: str
    key: str
    payload: bytes
    retain: bool
    batch: str = ""
    qos: int = 1  # 0: ephemeral (typing), published once and never stored


class StorageError(Exception):
    """The store failed. The store's own errors, whatever the database behind it:

    StorageError            the statement failed (a bug, bad data): the command is answered `internal`
    ├── StorageUnavailable  the database cannot be reached or dropped the connection: retried, unanswered
    └── Conflict            a uniqueness rule was hit by a concurrent writer: the command is retried

    `bridge.sql` translates the driver's errors into these at its boundary (`bridge/sql/errors.py`).
    """


class StorageUnavailable(StorageError):
    """An outage: nothing was done; `connection_lost` when the connection itself was found dead (a fresh
    one may work at once)."""

    def __init__(self, message: str, *, connection_lost: bool = False) -> None:
        super().__init__(message)
        self.connection_lost = connection_lost


class Conflict(StorageError):
    """A uniqueness rule was hit by a concurrent writer; the command may be retried."""


class Store(Protocol):
    """What the core needs from storage, inside one open transaction.

    Implemented by `bridge.sql.SqlStore` (SQLModel) and `bridge.memory.MemoryStore`.
    """

    def atomic(self) -> AbstractContextManager[None]:
        """A savepoint: everything written inside is undone if the block raises."""
        ...

    # users
    def get_user(self, user_id: str) -> User | None: ...
    def save_user(self, user: User) -> None: ...
    def get_users(self, user_ids: Sequence[str]) -> list[User]: ...
    def all_user_ids(self) -> list[str]: ...
    def user_ids_ignoring_case(self, user_id: str) -> list[str]:
        """The ids of users whose id equals `user_id` when case is ignored (ids are ASCII)."""
        ...

    # sessions
    def get_session(self, user_id: str, session_id: str) -> ChatSession | None: ...
    def save_session(self, session: ChatSession) -> None: ...
    def has_active_session(self, user_id: str) -> bool: ...
    def active_user_ids(self) -> list[str]: ...
    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]: ...
    def without_active_session(self, user_ids: Sequence[str]) -> list[str]:
        """Those of the users who have no active session, in the given order."""
        ...

    # conversations
    def get_conversation(self, conversation_id: str) -> Conversation | None: ...
    def find_direct(self, key: str) -> Conversation | None: ...
    def find_thread(self, parent_message_id: str) -> Conversation | None: ...
    def add_conversation(
        self, conversation: Conversation, participants: Sequence[str], direct_key: str | None = None
    ) -> None:
        """Raises `Conflict` when the direct pair or the thread's root message already has one; call it
        inside `atomic()`, whose rollback clears the failed statement (PostgreSQL needs that)."""
        ...

    def participant_ids(self, conversation_id: str) -> list[str]: ...
    def participants_online(self, conversation_id: str) -> list[tuple[str, bool]]:
        """`participant_ids` with whether each has an active session, in one look-up."""
        ...

    def is_participant(self, conversation_id: str, user_id: str) -> bool: ...
    def add_participants(self, conversation_id: str, user_ids: Sequence[str]) -> None: ...
    def remove_participant(self, conversation_id: str, user_id: str) -> None: ...
    def conversations_of(self, user_id: str) -> list[Conversation]:
        """Direct and group conversations the user takes part in, and their threads."""
        ...

    def membership_counts(self, user_ids: Sequence[str]) -> dict[str, int]:
        """How many direct and group conversations each user takes part in (users in none are absent)."""
        ...

    def threads_of(self, conversation_id: str) -> list[Conversation]: ...
    def delete_conversation(self, conversation_id: str) -> None:
        """Deletes the conversation, its participants and its messages (not its threads)."""
        ...

    # messages
    def next_position(self, conversation_id: str) -> tuple[int, int]:
        """Increments the conversation's last_seq and last_rev; returns the new (seq, rev)."""
        ...

    def next_rev(self, conversation_id: str) -> int:
        """Increments the conversation's last_rev and returns the new value."""
        ...

    def add_message(self, message: Message) -> None: ...
    def update_message(self, message: Message, expected_rev: int) -> None:
        """Stores the message's new body, times, reactions and rev (and keeps search in step with
        them); raises `Conflict` when its stored rev is no longer `expected_rev`."""
        ...

    def get_message(self, message_id: str) -> Message | None: ...
    def find_by_client_msg_id(
        self, conversation_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None: ...
    def messages_after_seq(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        """Ascending, seq > after_seq, at most `limit`."""
        ...

    def messages_after_ms(self, conversation_id: str, after_ms: int, limit: int) -> list[Message]:
        """Ascending by seq, created strictly after `after_ms`, at most `limit`."""
        ...

    def messages_before_seq(self, conversation_id: str, before_seq: int | None, limit: int) -> list[Message]:
        """The newest `limit` messages with seq < before_seq (all when None), descending."""
        ...

    def messages_after_rev(self, conversation_id: str, after_rev: int, limit: int) -> list[Message]:
        """Ascending by rev, rev > after_rev, at most `limit`."""
        ...

    def search(
        self,
        conversation_ids: Sequence[str],
        query_words: Sequence[str],
        before: Message | None,
        limit: int,
    ) -> list[Message]:
        """Messages not deleted, in these conversations, whose words include every query word;
        newest (created_ms, then message_id) first, older than `before` when given; at most `limit`."""
        ...

    # read markers
    def read_seq(self, conversation_id: str, user_id: str) -> int: ...
    def read_markers(self, user_id: str) -> dict[str, int]:
        """The user's markers by conversation id (conversations without one are absent)."""
        ...

    def set_read_seq(self, conversation_id: str, user_id: str, seq: int) -> None:
        """Moves the marker to `seq` if that is forward; never back."""
        ...

    def forget_read_markers(self, conversation_ids: Sequence[str], user_id: str) -> None: ...

    # the transactional outbox
    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None: ...
    def forget_outbox(self, batches: Sequence[str]) -> None:
        """Deletes the entries of batches whose publishing the broker acknowledged."""
        ...

    def pending_outbox(self) -> list[OutboxEntry]:
        """Every entry not yet forgotten, oldest first."""
        ...


class UnitOfWork(Protocol):
    """Opens a transaction and yields a Store bound to it; commits when the block ends cleanly."""

    def transaction(self) -> AbstractContextManager[Store]: ...
    def reading(self) -> AbstractContextManager[Store]:
        """A Store for reads only (nothing written is kept): no write lock, nothing to commit."""
        ...


def paged(rows: Sequence[Message], limit: int) -> tuple[list[Message], bool]:
    """Split a `limit + 1` query result into the page and `has_more`."""
    return list(rows[:limit]), len(rows) > limit
