"""The tables (SQLModel models; the migrations create them) and how their rows become records.

History queries are keyset queries on (conversation_id, seq); there is no OFFSET.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, Text, UniqueConstraint, literal_column
from sqlalchemy.dialects import postgresql
from sqlmodel import Field, SQLModel

from ..model import Conversation, Message, Reactions, words


class UserRow(SQLModel, table=True):
    __tablename__ = "users"
    user_id: str = Field(primary_key=True, max_length=64)
    display_name: str | None = Field(default=None, max_length=100)
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class SessionRow(SQLModel, table=True):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_active", "ended_ms", "user_id"),)
    user_id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(primary_key=True, max_length=64)
    epoch: str = Field(max_length=64)
    started_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    ended_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class ConversationRow(SQLModel, table=True):
    __tablename__ = "conversations"
    # Unique: one thread per root message, one direct conversation per pair, enforced by the database.
    __table_args__ = (
        Index("ix_conversations_parent_message_id", "parent_message_id", unique=True),
        Index("ix_conversations_direct_key", "direct_key", unique=True),
    )
    conversation_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=16)
    title: str | None = Field(default=None, max_length=200)
    owner_id: str | None = Field(default=None, max_length=64)
    parent_conversation_id: str | None = Field(default=None, max_length=64, index=True)
    parent_message_id: str | None = Field(default=None, max_length=64)
    direct_key: str | None = Field(default=None, max_length=129)
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    last_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    last_rev: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


class ReadMarkerRow(SQLModel, table=True):
    """(1.1) A user's read marker in a conversation; absent means 0."""

    __tablename__ = "read_markers"
    __table_args__ = (Index("ix_read_markers_user", "user_id"),)
    conversation_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(primary_key=True, max_length=64)
    read_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


class ParticipantRow(SQLModel, table=True):
    __tablename__ = "participants"
    __table_args__ = (Index("ix_participants_user", "user_id", "conversation_id"),)
    conversation_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(primary_key=True, max_length=64)


class MessageRow(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_seq"),
        UniqueConstraint("conversation_id", "sender_id", "client_msg_id", name="uq_messages_client_msg_id"),
        Index("ix_messages_created", "conversation_id", "created_ms", "seq"),
        Index("uq_messages_rev", "conversation_id", "rev", unique=True),
        Index("uq_messages_search_rowid", "search_rowid", unique=True),
    )
    message_id: str = Field(primary_key=True, max_length=64)
    conversation_id: str = Field(max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    sender_id: str = Field(max_length=64)
    body: str = Field(sa_column=Column(Text, nullable=False))
    client_msg_id: str | None = Field(default=None, max_length=64)
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    rev: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    edited_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    deleted_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    reactions: str = Field(default="{}", sa_column=Column(Text, nullable=False, server_default="{}"))
    # Search: SQLite links each message to its row of the FTS5 table `message_search` (NULL when it has no
    # words or is deleted); PostgreSQL keeps the words' tsvector here, under a GIN index. Each dialect
    # leaves the other's column NULL. Both index `model.words(body)`, so they agree on what a word is.
    search_rowid: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    search_vector: str | None = Field(
        default=None, sa_column=Column(postgresql.TSVECTOR().with_variant(Text(), "sqlite"), nullable=True)
    )


class OutboxRow(SQLModel, table=True):
    """Events committed with the changes they report, waiting to be (or being) published."""

    __tablename__ = "outbox"
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    batch: str = Field(max_length=32, index=True)
    kind: str = Field(max_length=16)
    key: str = Field(max_length=64)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    retain: bool = Field(default=False)


users = UserRow.__table__  # type: ignore[attr-defined]
sessions = SessionRow.__table__  # type: ignore[attr-defined]
conversations = ConversationRow.__table__  # type: ignore[attr-defined]
participants = ParticipantRow.__table__  # type: ignore[attr-defined]
messages = MessageRow.__table__  # type: ignore[attr-defined]
outbox = OutboxRow.__table__  # type: ignore[attr-defined]
read_markers = ReadMarkerRow.__table__  # type: ignore[attr-defined]

# Made by the migrations for one dialect only, outside the models: the FTS5 table (and its shadow tables)
# on SQLite, the GIN index on PostgreSQL.
SEARCH_OBJECTS = ("message_search", "ix_messages_search")

CONV_COLS = (
    conversations.c.conversation_id,
    conversations.c.kind,
    conversations.c.title,
    conversations.c.owner_id,
    conversations.c.parent_conversation_id,
    conversations.c.parent_message_id,
    conversations.c.created_ms,
    conversations.c.last_seq,
    conversations.c.last_rev,
)
SESSION_COLS = (
    sessions.c.user_id,
    sessions.c.session_id,
    sessions.c.epoch,
    sessions.c.started_ms,
    sessions.c.ended_ms,
)
MSG_COLS = (
    messages.c.message_id,
    messages.c.conversation_id,
    messages.c.seq,
    messages.c.sender_id,
    messages.c.body,
    messages.c.client_msg_id,
    messages.c.created_ms,
    messages.c.rev,
    messages.c.edited_ms,
    messages.c.deleted_ms,
    messages.c.reactions,
)
MSG_FIELDS = [c.name for c in MSG_COLS]
SIMPLE: Any = literal_column("'simple'::regconfig")  # PostgreSQL: no stemming, no stop words


def conversation_of(row: Any) -> Conversation | None:
    """The conversation of a row of CONV_COLS."""
    return Conversation(*row) if row is not None else None


def reactions_of(raw: str) -> Reactions:
    return tuple((emoji, tuple(users)) for emoji, users in orjson.loads(raw).items()) if raw != "{}" else ()


def reactions_json(reactions: Reactions) -> str:
    return orjson.dumps({emoji: list(users) for emoji, users in reactions}).decode() if reactions else "{}"


def message_of(row: Any) -> Message | None:
    """The message of a row of MSG_COLS."""
    if row is None:
        return None
    mid, cid, seq, sender, body, client_msg_id, created, rev, edited, deleted, reactions = row  # MSG_COLS
    return Message(
        mid, cid, seq, sender, body, client_msg_id, created, rev, edited, deleted, reactions_of(reactions)
    )


def message_values(m: Message) -> dict[str, Any]:
    """The message as the values of MSG_FIELDS."""
    values = {name: getattr(m, name) for name in MSG_FIELDS}
    values["reactions"] = reactions_json(m.reactions)
    return values


def search_text(m: Message) -> str | None:
    """The words that search indexes for the message, joined by spaces; None when there are none."""
    found = words(m.body) if not m.deleted else []
    return " ".join(found) if found else None
