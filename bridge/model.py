"""Domain records and the storage interface the core depends on.

Records are plain frozen dataclasses with times as integer milliseconds since
the epoch; they know nothing of JSON, MQTT or SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

GLOBAL_ID = "global"
Kind = Literal["global", "direct", "group", "thread"]


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


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    conversation_id: str
    seq: int
    sender_id: str
    body: str
    client_msg_id: str | None
    created_ms: int


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


class Conflict(Exception):
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

    # sessions
    def get_session(self, user_id: str, session_id: str) -> ChatSession | None: ...
    def save_session(self, session: ChatSession) -> None: ...
    def has_active_session(self, user_id: str) -> bool: ...
    def active_user_ids(self) -> list[str]: ...
    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]: ...

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
    def next_seq(self, conversation_id: str) -> int:
        """Increments the conversation's last_seq and returns the new value."""
        ...

    def add_message(self, message: Message) -> None: ...
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


def paged(rows: Sequence[Message], limit: int) -> tuple[list[Message], bool]:
    """Split a `limit + 1` query result into the page and `has_more`."""
    return list(rows[:limit]), len(rows) > limit
