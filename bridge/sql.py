"""The SQL store: SQLModel tables, queried with SQLAlchemy Core on one connection per transaction.

SQLite (a file in WAL mode) by default, PostgreSQL in production. History
queries are keyset queries on (conversation_id, seq); there is no OFFSET.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    event,
    func,
    insert,
    inspect,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import (
    DatabaseError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement
from sqlmodel import Field, SQLModel, create_engine

from .model import (
    GLOBAL_ID,
    ChatSession,
    Conflict,
    Conversation,
    Message,
    OutboxEntry,
    Reactions,
    StorageError,
    StorageUnavailable,
    Store,
    User,
    words,
)

log = logging.getLogger(__name__)

# The store's errors for SQLAlchemy's wrappers of the PEP 249 exceptions (the driver's, sqlite3 or psycopg,
# are wrapped first, as `Connection.execute` would): nothing past this module sees a SQLAlchemy error.
# A lost connection is StorageUnavailable whatever its class. tests/unit/test_storage_errors.py fails when
# SQLAlchemy has a DBAPIError subclass missing here.
TRANSLATION: dict[type[DBAPIError], type[StorageError]] = {
    IntegrityError: Conflict,
    OperationalError: StorageUnavailable,  # unreachable, restarting, locked, out of disk
    InterfaceError: StorageUnavailable,  # the connection is unusable
    DataError: StorageError,
    ProgrammingError: StorageError,
    NotSupportedError: StorageError,
    InternalError: StorageError,
    DatabaseError: StorageError,
    DBAPIError: StorageError,
}

# Errors that mean "the database is unreachable": the batch is retried, never answered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailable,)


def storage_error(exc: DBAPIError) -> StorageError:
    """The store's error for SQLAlchemy's."""
    message = str(exc.orig) if exc.orig is not None else str(exc)
    if exc.connection_invalidated:
        return StorageUnavailable(message, connection_lost=True)
    kind = next(TRANSLATION[cls] for cls in type(exc).__mro__ if cls in TRANSLATION)
    return kind(message)


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

_CONV_COLS = (
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
_SESSION_COLS = (
    sessions.c.user_id,
    sessions.c.session_id,
    sessions.c.epoch,
    sessions.c.started_ms,
    sessions.c.ended_ms,
)
_MSG_COLS = (
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
_MSG_FIELDS = [c.name for c in _MSG_COLS]
SIMPLE: Any = literal_column("'simple'::regconfig")  # PostgreSQL: no stemming, no stop words


def _conv(row: Any) -> Conversation | None:
    return Conversation(*row) if row is not None else None


def _reactions(raw: str) -> Reactions:
    return tuple((emoji, tuple(users)) for emoji, users in orjson.loads(raw).items()) if raw != "{}" else ()


def _reactions_json(reactions: Reactions) -> str:
    return orjson.dumps({emoji: list(users) for emoji, users in reactions}).decode() if reactions else "{}"


def _msg(row: Any) -> Message | None:
    if row is None:
        return None
    mid, cid, seq, sender, body, client_msg_id, created, rev, edited, deleted, reactions = row  # _MSG_COLS
    return Message(
        mid, cid, seq, sender, body, client_msg_id, created, rev, edited, deleted, _reactions(reactions)
    )


def _message_values(m: Message) -> dict[str, Any]:
    values = {name: getattr(m, name) for name in _MSG_FIELDS}
    values["reactions"] = _reactions_json(m.reactions)
    return values


def _search_text(m: Message) -> str | None:
    """The words that search indexes for the message, joined by spaces; None when there are none."""
    found = words(m.body) if not m.deleted else []
    return " ".join(found) if found else None


def _statements(dialect: str) -> dict[str, tuple[ClauseElement, list[str] | None]]:
    """Every static statement of the store, by name, with the columns an INSERT takes."""
    b = bindparam
    conv, msg = select(*_CONV_COLS), select(*_MSG_COLS)
    pg = dialect == "postgresql"
    upsert = (postgresql.insert if pg else sqlite.insert)(read_markers).values(
        conversation_id=b("cid"), user_id=b("user_id"), read_seq=b("seq")
    )
    forward = (func.greatest if pg else func.max)(read_markers.c.read_seq, upsert.excluded.read_seq)
    message_update: dict[str, Any] = {
        name: b(f"new_{name}") for name in ("body", "edited_ms", "deleted_ms", "reactions", "rev")
    }
    if pg:
        search_insert = (insert(messages).values(search_vector=func.to_tsvector(SIMPLE, b("words"))), None)
        search_update: dict[str, Any] = {"search_vector": func.to_tsvector(SIMPLE, b("words"))}
    else:
        search_insert = (insert(messages).values(search_rowid=b("search_rowid")), None)
        search_update = {"search_rowid": b("search_rowid")}
    mine = select(participants.c.conversation_id).where(participants.c.user_id == b("user_id"))
    return {
        "get_user": (
            select(users.c.user_id, users.c.display_name, users.c.created_ms).where(
                users.c.user_id == b("user_id")
            ),
            None,
        ),
        "update_user": (
            update(users).where(users.c.user_id == b("user_id")).values(display_name=b("name")),
            None,
        ),
        "insert_user": (insert(users).inline(), ["user_id", "display_name", "created_ms"]),
        "all_user_ids": (select(users.c.user_id).order_by(users.c.user_id), None),
        "user_ids_ignoring_case": (
            select(users.c.user_id).where(func.lower(users.c.user_id) == b("lowered")),
            None,
        ),
        "get_session": (
            select(*_SESSION_COLS).where(
                sessions.c.user_id == b("user_id"), sessions.c.session_id == b("session_id")
            ),
            None,
        ),
        "update_session": (  # SET binds take the column names; the WHERE ones may not
            update(sessions).where(sessions.c.user_id == b("uid"), sessions.c.session_id == b("sid")),
            ["epoch", "started_ms", "ended_ms"],
        ),
        "insert_session": (
            insert(sessions).inline(),
            ["user_id", "session_id", "epoch", "started_ms", "ended_ms"],
        ),
        "has_active_session": (
            select(sessions.c.session_id)
            .where(sessions.c.user_id == b("user_id"), sessions.c.ended_ms.is_(None))
            .limit(1),
            None,
        ),
        "active_user_ids": (
            select(sessions.c.user_id)
            .where(sessions.c.ended_ms.is_(None))
            .distinct()
            .order_by(sessions.c.user_id),
            None,
        ),
        "active_sessions_outside_epoch": (
            select(*_SESSION_COLS).where(sessions.c.ended_ms.is_(None), sessions.c.epoch != b("epoch_")),
            None,
        ),
        "get_conversation": (conv.where(conversations.c.conversation_id == b("cid")), None),
        "find_direct": (conv.where(conversations.c.direct_key == b("key")), None),
        "find_thread": (conv.where(conversations.c.parent_message_id == b("mid")), None),
        "insert_conversation": (
            insert(conversations).inline(),
            [c.name for c in _CONV_COLS] + ["direct_key"],
        ),
        "participant_ids": (
            select(participants.c.user_id)
            .where(participants.c.conversation_id == b("cid"))
            .order_by(participants.c.user_id),
            None,
        ),
        "is_participant": (
            select(participants.c.user_id).where(
                participants.c.conversation_id == b("cid"), participants.c.user_id == b("user_id")
            ),
            None,
        ),
        "insert_participant": (insert(participants).inline(), ["conversation_id", "user_id"]),
        "remove_participant": (
            delete(participants).where(
                participants.c.conversation_id == b("cid"), participants.c.user_id == b("user_id")
            ),
            None,
        ),
        "conversations_of": (
            conv.where(
                conversations.c.conversation_id.in_(mine)
                | conversations.c.parent_conversation_id.in_(mine)
                | (conversations.c.parent_conversation_id == GLOBAL_ID)
            ).order_by(conversations.c.created_ms, conversations.c.conversation_id),
            None,
        ),
        "threads_of": (conv.where(conversations.c.parent_conversation_id == b("cid")), None),
        "delete_search_rows": (
            text(
                "DELETE FROM message_search WHERE rowid IN "
                "(SELECT search_rowid FROM messages WHERE conversation_id = :cid)"
            )
            if not pg
            else select(literal_column("1")),
            None,
        ),
        "delete_read_markers": (delete(read_markers).where(read_markers.c.conversation_id == b("cid")), None),
        "delete_messages": (delete(messages).where(messages.c.conversation_id == b("cid")), None),
        "delete_participants": (delete(participants).where(participants.c.conversation_id == b("cid")), None),
        "delete_conversation": (
            delete(conversations).where(conversations.c.conversation_id == b("cid")),
            None,
        ),
        "next_position": (
            update(conversations)
            .where(conversations.c.conversation_id == b("cid"))
            .values(
                last_seq=conversations.c.last_seq + literal_column("1"),
                last_rev=conversations.c.last_rev + literal_column("1"),
            )
            .returning(conversations.c.last_seq, conversations.c.last_rev),
            None,
        ),
        "next_rev": (
            update(conversations)
            .where(conversations.c.conversation_id == b("cid"))
            .values(last_rev=conversations.c.last_rev + literal_column("1"))
            .returning(conversations.c.last_rev),
            None,
        ),
        "insert_message": (search_insert[0].inline(), _MSG_FIELDS),
        "update_message": (
            update(messages)
            .where(messages.c.message_id == b("mid"), messages.c.rev == b("expected_rev"))
            .values(**message_update),
            None,
        ),
        "update_message_search": (
            update(messages).where(messages.c.message_id == b("mid")).values(**search_update),
            None,
        ),
        # SQLite's FTS5 rows (no-ops on PostgreSQL, whose index follows the column)
        # The FTS5 rowid orders search results: created_ms * 4096 + the order of insertion within that
        # millisecond, so that the newest first is a backwards walk of the index that stops at the limit.
        "insert_search_row": (
            text(
                "INSERT INTO message_search(rowid, words) VALUES (coalesce((SELECT max(rowid) + 1 FROM "
                "message_search WHERE rowid BETWEEN :lo AND :lo + 4095), :lo), :words)"
            ),
            None,
        ),
        "search_rowid_of": (select(messages.c.search_rowid).where(messages.c.message_id == b("mid")), None),
        "update_search_row": (text("UPDATE message_search SET words = :words WHERE rowid = :rowid"), None),
        "delete_search_row_by_id": (text("DELETE FROM message_search WHERE rowid = :rowid"), None),
        "delete_search_row": (
            text(
                "DELETE FROM message_search WHERE rowid = "
                "(SELECT search_rowid FROM messages WHERE message_id = :mid)"
            ),
            None,
        ),
        "messages_after_rev": (
            msg.where(messages.c.conversation_id == b("cid"), messages.c.rev > b("rev"))
            .order_by(messages.c.rev)
            .limit(b("lim")),
            None,
        ),
        "read_seq": (
            select(read_markers.c.read_seq).where(
                read_markers.c.conversation_id == b("cid"), read_markers.c.user_id == b("user_id")
            ),
            None,
        ),
        "read_markers": (
            select(read_markers.c.conversation_id, read_markers.c.read_seq).where(
                read_markers.c.user_id == b("user_id")
            ),
            None,
        ),
        "set_read_seq": (
            upsert.on_conflict_do_update(
                index_elements=["conversation_id", "user_id"], set_={"read_seq": forward}
            ),
            None,
        ),
        "get_message": (msg.where(messages.c.message_id == b("mid")), None),
        "find_by_client_msg_id": (
            msg.where(
                messages.c.conversation_id == b("cid"),
                messages.c.sender_id == b("sender"),
                messages.c.client_msg_id == b("client_msg_id"),
            ),
            None,
        ),
        "messages_after_seq": (
            msg.where(messages.c.conversation_id == b("cid"), messages.c.seq > b("seq"))
            .order_by(messages.c.seq)
            .limit(b("lim")),
            None,
        ),
        # A timestamp becomes a seq cursor: the first message created after it, read from the
        # (conversation_id, created_ms, seq) index; then the usual keyset scan on seq.
        "first_seq_after_ms": (
            select(messages.c.seq)
            .where(messages.c.conversation_id == b("cid"), messages.c.created_ms > b("ms"))
            .order_by(messages.c.created_ms, messages.c.seq)
            .limit(literal_column("1")),
            None,
        ),
        "messages_from_seq_after_ms": (
            msg.where(
                messages.c.conversation_id == b("cid"),
                messages.c.seq >= b("seq"),
                messages.c.created_ms > b("ms"),
            )
            .order_by(messages.c.seq)
            .limit(b("lim")),
            None,
        ),
        "messages_before_seq": (
            msg.where(messages.c.conversation_id == b("cid"), messages.c.seq < b("seq"))
            .order_by(messages.c.seq.desc())
            .limit(b("lim")),
            None,
        ),
        "newest_messages": (
            msg.where(messages.c.conversation_id == b("cid")).order_by(messages.c.seq.desc()).limit(b("lim")),
            None,
        ),
        "insert_outbox": (insert(outbox).inline(), ["batch", "kind", "key", "payload", "retain"]),
        "forget_outbox": (delete(outbox).where(outbox.c.batch == b("batch")), None),
        "pending_outbox": (
            select(outbox.c.kind, outbox.c.key, outbox.c.payload, outbox.c.retain, outbox.c.batch).order_by(
                outbox.c.id
            ),
            None,
        ),
    }


@dataclass(frozen=True, slots=True)
class _Prepared:
    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for drivers with positional parameters
    constants: dict[str, Any]  # values bound in the statement itself, such as a LIMIT 1 or an IN list

    @classmethod
    def compile(
        cls, stmt: ClauseElement, dialect: Dialect, columns: list[str] | None = None, **kwargs: Any
    ) -> _Prepared:
        compiled = cast(
            SQLCompiler, stmt.compile(dialect=dialect, column_keys=columns, compile_kwargs=kwargs)
        )
        positions = tuple(compiled.positiontup or ()) if dialect.positional else None
        binds = compiled.binds
        constants = {  # what the caller passes (required binds, columns of an INSERT/UPDATE) is not here
            key: value
            for key, value in compiled.params.items()
            if value is not None and not (key in binds and binds[key].required)
        }
        return cls(str(compiled), positions, constants)

    def args(self, params: dict[str, Any]) -> Any:
        if self.constants:
            params = {**self.constants, **params}
        return params if self.positions is None else tuple(params[name] for name in self.positions)


# Statements over a list of values (an IN list), by name: each is compiled once per length of the list,
# not per call (compiling the expanding IN of `without_active_session` for every message was a quarter
# of the bridge's database CPU). Lists are padded to the next power of two with their last value (an
# IN list means the same with a value repeated), so that at most log2(IN_CHUNK) + 1 lengths exist;
# longer lists run in chunks of IN_CHUNK.
IN_CHUNK = 512
_LISTED: dict[str, Callable[[list[Any]], ClauseElement]] = {
    "without_active_session": lambda values: (
        select(sessions.c.user_id)
        .where(sessions.c.ended_ms.is_(None), sessions.c.user_id.in_(values))
        .distinct()
    ),
    "get_users": lambda values: (
        select(users.c.user_id, users.c.display_name, users.c.created_ms)
        .where(users.c.user_id.in_(values))
        .order_by(users.c.user_id)
    ),
    "membership_counts": lambda values: (
        select(participants.c.user_id, func.count())
        .where(participants.c.user_id.in_(values))
        .group_by(participants.c.user_id)
    ),
    "forget_read_markers": lambda values: delete(read_markers).where(
        read_markers.c.user_id == bindparam("user_id"), read_markers.c.conversation_id.in_(values)
    ),
}


class Statements:
    """The store's statements compiled for one dialect (SQLAlchemy builds the SQL; the driver runs it):
    the static ones at once, those over a list per length when first used."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.named = {
            name: _Prepared.compile(stmt, dialect, columns)
            for name, (stmt, columns) in _statements(dialect.name).items()
        }
        self._listed: dict[tuple[str, int], _Prepared] = {}

    def __getitem__(self, name: str) -> _Prepared:
        return self.named[name]

    def listed(self, name: str, length: int) -> _Prepared:
        """The statement `name` over a list of `length` values, bound as i0, i1, ..."""
        found = self._listed.get((name, length))
        if found is None:
            stmt = _LISTED[name]([bindparam(f"i{k}") for k in range(length)])
            found = self._listed[(name, length)] = _Prepared.compile(stmt, self.dialect)
        return found


def prepare(dialect: Dialect) -> Statements:
    return Statements(dialect)


class SqlStore:
    """A Store bound to one connection with an open transaction.

    It runs precompiled statements on the driver's cursor: building, caching and wrapping a SQLAlchemy
    statement per call cost 15-50 µs, the SQLite statement itself about 1 (py-spy under
    bench/throughput.py). Driver errors are translated to the store's (`storage_error`).
    """

    def __init__(self, conn: PoolProxiedConnection, dialect: Dialect, statements: Statements) -> None:
        self.conn = conn
        self.dialect = dialect
        self.q = statements
        self.raw = conn.dbapi_connection
        assert self.raw is not None
        self.cur = self.raw.cursor()
        self._depth = 0

    def _run(self, sql: str, args: Any = (), *, many: bool = False) -> Any:
        try:
            if many:
                self.cur.executemany(sql, args)
            else:
                self.cur.execute(sql, args)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self.translate(exc, sql, args) from None
        return self.cur

    def translate(self, exc: Any, sql: str = "", args: Any = ()) -> StorageError:
        """The store's error for a driver error (through SQLAlchemy's classification, as
        `Connection.execute` would raise it); a lost connection is dropped from the pool."""
        lost = self.dialect.is_disconnect(exc, self.raw, self.cur)
        if lost:
            self.conn.invalidate(exc)
        wrapped = DBAPIError.instance(
            sql, args, exc, self.dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=self.dialect
        )
        return storage_error(wrapped)

    def _core(self, stmt: ClauseElement) -> Any:
        """A statement that varies per call (an IN list), compiled here."""
        q = _Prepared.compile(stmt, self.dialect, render_postcompile=True)
        return self._run(q.sql, q.args({}))

    def _exec(self, name: str, /, **params: Any) -> Any:
        q = self.q[name]
        return self._run(q.sql, q.args(params))

    def _listed(self, name: str, values: Sequence[str], /, *, rows: bool = True, **params: Any) -> list[Any]:
        """Runs the statement `name` over the distinct `values` (in chunks of IN_CHUNK, each padded to a
        compiled length); the rows of every chunk when `rows`."""
        unique = list(dict.fromkeys(values))
        found: list[Any] = []
        for start in range(0, len(unique), IN_CHUNK):
            chunk = unique[start : start + IN_CHUNK]
            length = 1 << (len(chunk) - 1).bit_length()
            q = self.q.listed(name, length)
            padded = chunk + [chunk[-1]] * (length - len(chunk))
            cur = self._run(q.sql, q.args({**params, **{f"i{k}": v for k, v in enumerate(padded)}}))
            if rows:
                found.extend(cur.fetchall())
        return found

    def _many(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        q = self.q[name]
        self._run(q.sql, [q.args(r) for r in rows], many=True)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        name = f"sp{self._depth}"
        self._run(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._run(f"ROLLBACK TO SAVEPOINT {name}")
            self._run(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            self._run(f"RELEASE SAVEPOINT {name}")
        finally:
            self._depth -= 1

    # users
    def get_user(self, user_id: str) -> User | None:
        row = self._exec("get_user", user_id=user_id).fetchone()
        return User(*row) if row else None

    def save_user(self, user: User) -> None:
        if self._exec("update_user", user_id=user.user_id, name=user.display_name).rowcount == 0:
            self._exec(
                "insert_user",
                user_id=user.user_id,
                display_name=user.display_name,
                created_ms=user.created_ms,
            )

    def get_users(self, user_ids: Sequence[str]) -> list[User]:
        if not user_ids:
            return []
        rows = self._listed("get_users", user_ids)
        if len(set(user_ids)) > IN_CHUNK:
            rows.sort()  # ordered by user_id within each chunk
        return [User(*r) for r in rows]

    def all_user_ids(self) -> list[str]:
        return [r[0] for r in self._exec("all_user_ids").fetchall()]

    def user_ids_ignoring_case(self, user_id: str) -> list[str]:
        rows = self._exec("user_ids_ignoring_case", lowered=user_id.lower()).fetchall()
        return sorted(r[0] for r in rows)

    # sessions
    def get_session(self, user_id: str, session_id: str) -> ChatSession | None:
        row = self._exec("get_session", user_id=user_id, session_id=session_id).fetchone()
        return ChatSession(*row) if row else None

    def save_session(self, s: ChatSession) -> None:
        row = dataclasses.asdict(s)
        if self._exec("update_session", uid=s.user_id, sid=s.session_id, **row).rowcount == 0:
            self._exec("insert_session", **row)

    def has_active_session(self, user_id: str) -> bool:
        return self._exec("has_active_session", user_id=user_id).fetchone() is not None

    def active_user_ids(self) -> list[str]:
        return [r[0] for r in self._exec("active_user_ids").fetchall()]

    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]:
        return [ChatSession(*r) for r in self._exec("active_sessions_outside_epoch", epoch_=epoch).fetchall()]

    def without_active_session(self, user_ids: Sequence[str]) -> list[str]:
        if not user_ids:
            return []
        if len(user_ids) <= (1 if self._pg else 4):
            # Measured: for a few ids (a direct message's one), a precompiled lookup each beats one IN
            # query on SQLite (calls into the library); on PostgreSQL, where each is a round trip, for one.
            return [u for u in user_ids if not self.has_active_session(u)]
        active = {r[0] for r in self._listed("without_active_session", user_ids)}
        return [u for u in user_ids if u not in active]

    # conversations
    def get_conversation(self, conversation_id: str) -> Conversation | None:
        return _conv(self._exec("get_conversation", cid=conversation_id).fetchone())

    def find_direct(self, key: str) -> Conversation | None:
        return _conv(self._exec("find_direct", key=key).fetchone())

    def find_thread(self, parent_message_id: str) -> Conversation | None:
        return _conv(self._exec("find_thread", mid=parent_message_id).fetchone())

    def add_conversation(
        self, conversation: Conversation, participants_: Sequence[str], direct_key: str | None = None
    ) -> None:
        values = {col.name: getattr(conversation, col.name) for col in _CONV_COLS}
        self._exec("insert_conversation", direct_key=direct_key, **values)  # Conflict: a twin exists
        self.add_participants(conversation.conversation_id, participants_)

    def participant_ids(self, conversation_id: str) -> list[str]:
        return [r[0] for r in self._exec("participant_ids", cid=conversation_id).fetchall()]

    def is_participant(self, conversation_id: str, user_id: str) -> bool:
        return self._exec("is_participant", cid=conversation_id, user_id=user_id).fetchone() is not None

    def add_participants(self, conversation_id: str, user_ids: Sequence[str]) -> None:
        if user_ids:
            self._many(
                "insert_participant", [{"conversation_id": conversation_id, "user_id": u} for u in user_ids]
            )

    def remove_participant(self, conversation_id: str, user_id: str) -> None:
        self._exec("remove_participant", cid=conversation_id, user_id=user_id)

    def conversations_of(self, user_id: str) -> list[Conversation]:
        return [Conversation(*r) for r in self._exec("conversations_of", user_id=user_id).fetchall()]

    def membership_counts(self, user_ids: Sequence[str]) -> dict[str, int]:
        if not user_ids:
            return {}
        return {user_id: count for user_id, count in self._listed("membership_counts", user_ids)}

    def threads_of(self, conversation_id: str) -> list[Conversation]:
        return [Conversation(*r) for r in self._exec("threads_of", cid=conversation_id).fetchall()]

    def delete_conversation(self, conversation_id: str) -> None:
        names = ["delete_read_markers", "delete_messages", "delete_participants", "delete_conversation"]
        if not self._pg:
            names.insert(0, "delete_search_rows")
        for name in names:
            self._exec(name, cid=conversation_id)

    @property
    def _pg(self) -> bool:
        return self.dialect.name == "postgresql"

    # messages
    def next_position(self, conversation_id: str) -> tuple[int, int]:
        row = self._exec("next_position", cid=conversation_id).fetchone()
        if row is None:
            raise LookupError(f"no conversation {conversation_id}")
        return int(row[0]), int(row[1])

    def next_rev(self, conversation_id: str) -> int:
        row = self._exec("next_rev", cid=conversation_id).fetchone()
        if row is None:
            raise LookupError(f"no conversation {conversation_id}")
        return int(row[0])

    def _search_row(self, message: Message) -> int | None:
        """SQLite: the new FTS5 row of the message's words (None when it has none)."""
        found = _search_text(message)
        if found is None:
            return None
        return int(self._exec("insert_search_row", words=found, lo=message.created_ms << 12).lastrowid)

    def add_message(self, message: Message) -> None:
        # No savepoint of its own: a Conflict always unwinds through the command's savepoint (atomic()).
        values = _message_values(message)
        if self._pg:
            values["words"] = _search_text(message)
        else:
            values["search_rowid"] = self._search_row(message)
        self._exec("insert_message", **values)  # Conflict: the client_msg_id (or seq) was taken

    def update_message(self, message: Message, expected_rev: int) -> None:
        stored = self.get_message(message.message_id)
        values = {f"new_{k}": v for k, v in _message_values(message).items()}
        if not self._exec(
            "update_message",
            mid=message.message_id,
            expected_rev=expected_rev,
            **{
                k: values[k]
                for k in ("new_body", "new_edited_ms", "new_deleted_ms", "new_reactions", "new_rev")
            },
        ).rowcount:
            raise Conflict(f"message {message.message_id} changed")
        if stored is not None and (stored.body, stored.deleted_ms) == (message.body, message.deleted_ms):
            return  # the words did not change (a reaction)
        if self._pg:
            self._exec("update_message_search", mid=message.message_id, words=_search_text(message))
        else:
            self._reindex(message)

    def _reindex(self, message: Message) -> None:
        """SQLite: the message's FTS5 row follows its words, keeping its place (rowid) in the order."""
        row = self._exec("search_rowid_of", mid=message.message_id).fetchone()
        rowid, found = (row[0] if row else None), _search_text(message)
        if rowid is not None and found is not None:
            self._exec("update_search_row", rowid=rowid, words=found)
        elif rowid is not None:
            self._exec("delete_search_row_by_id", rowid=rowid)
            self._exec("update_message_search", mid=message.message_id, search_rowid=None)
        elif found is not None:
            new = self._search_row(message)
            self._exec("update_message_search", mid=message.message_id, search_rowid=new)

    def get_message(self, message_id: str) -> Message | None:
        return _msg(self._exec("get_message", mid=message_id).fetchone())

    def find_by_client_msg_id(
        self, conversation_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None:
        row = self._exec(
            "find_by_client_msg_id", cid=conversation_id, sender=sender_id, client_msg_id=client_msg_id
        ).fetchone()
        return _msg(row)

    def _messages(self, name: str, /, **params: Any) -> list[Message]:
        return [m for r in self._exec(name, **params).fetchall() if (m := _msg(r)) is not None]

    def messages_after_seq(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        return self._messages("messages_after_seq", cid=conversation_id, seq=after_seq, lim=limit)

    def messages_after_ms(self, conversation_id: str, after_ms: int, limit: int) -> list[Message]:
        first = self._exec("first_seq_after_ms", cid=conversation_id, ms=after_ms).fetchone()
        if first is None:
            return []
        return self._messages(
            "messages_from_seq_after_ms", cid=conversation_id, seq=first[0], ms=after_ms, lim=limit
        )

    def messages_before_seq(self, conversation_id: str, before_seq: int | None, limit: int) -> list[Message]:
        if before_seq is None:
            return self._messages("newest_messages", cid=conversation_id, lim=limit)
        return self._messages("messages_before_seq", cid=conversation_id, seq=before_seq, lim=limit)

    def messages_after_rev(self, conversation_id: str, after_rev: int, limit: int) -> list[Message]:
        return self._messages("messages_after_rev", cid=conversation_id, rev=after_rev, lim=limit)

    def search(
        self,
        conversation_ids: Sequence[str],
        query_words: Sequence[str],
        before: Message | None,
        limit: int,
    ) -> list[Message]:
        if not conversation_ids or not query_words:
            return []
        if not self._pg:
            return self._search_fts5(conversation_ids, query_words, before, limit)
        matches = messages.c.search_vector.op("@@")(
            func.plainto_tsquery(SIMPLE, bindparam("q", " ".join(query_words)))
        )
        stmt = select(*_MSG_COLS).where(
            matches,
            messages.c.conversation_id.in_(set(conversation_ids)),
            messages.c.deleted_ms.is_(None),
        )
        if before is not None:
            stmt = stmt.where(
                tuple_(messages.c.created_ms, messages.c.message_id)
                < tuple_(bindparam("before_ms", before.created_ms), bindparam("before_id", before.message_id))
            )
        stmt = stmt.order_by(messages.c.created_ms.desc(), messages.c.message_id.desc()).limit(
            bindparam("lim", limit)
        )
        return [m for r in self._core(stmt).fetchall() if (m := _msg(r)) is not None]

    def _search_fts5(
        self, conversation_ids: Sequence[str], query_words: Sequence[str], before: Message | None, limit: int
    ) -> list[Message]:
        """Walks the FTS5 matches from the newest (highest rowid: see insert_search_row) and stops at
        the limit: the FTS table drives the join (CROSS JOIN), each match one lookup in messages. Ties
        within a millisecond come in the order they were stored."""
        fts = " ".join(f'"{w}"' for w in query_words)  # words are letters and digits: nothing to escape
        columns = ", ".join(f"m.{name}" for name in _MSG_FIELDS)
        older = ""
        params: dict[str, Any] = {"q": fts, "lim": limit, "cids": sorted(set(conversation_ids))}
        if before is not None:
            older = (
                "AND message_search.rowid < (SELECT coalesce(search_rowid, created_ms * 4096) "
                "FROM messages WHERE message_id = :before)"
            )
            params["before"] = before.message_id
        stmt = text(
            f"SELECT {columns} FROM message_search CROSS JOIN messages AS m "
            "ON m.search_rowid = message_search.rowid "
            f"WHERE message_search MATCH :q AND m.conversation_id IN :cids AND m.deleted_ms IS NULL {older} "
            "ORDER BY message_search.rowid DESC LIMIT :lim"
        ).bindparams(bindparam("cids", expanding=True), **{k: v for k, v in params.items() if k != "cids"})
        stmt = stmt.bindparams(cids=params["cids"])
        return [m for r in self._core(stmt).fetchall() if (m := _msg(r)) is not None]

    # read markers
    def read_seq(self, conversation_id: str, user_id: str) -> int:
        row = self._exec("read_seq", cid=conversation_id, user_id=user_id).fetchone()
        return int(row[0]) if row else 0

    def read_markers(self, user_id: str) -> dict[str, int]:
        return {cid: int(seq) for cid, seq in self._exec("read_markers", user_id=user_id).fetchall()}

    def set_read_seq(self, conversation_id: str, user_id: str, seq: int) -> None:
        self._exec("set_read_seq", cid=conversation_id, user_id=user_id, seq=seq)

    def forget_read_markers(self, conversation_ids: Sequence[str], user_id: str) -> None:
        if conversation_ids:
            self._listed("forget_read_markers", conversation_ids, rows=False, user_id=user_id)

    # the transactional outbox
    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            self._many(
                "insert_outbox",
                [
                    {"batch": e.batch, "kind": e.kind, "key": e.key, "payload": e.payload, "retain": e.retain}
                    for e in entries
                ],
            )

    def forget_outbox(self, batches: Sequence[str]) -> None:
        if batches:
            self._many("forget_outbox", [{"batch": b} for b in batches])

    def pending_outbox(self) -> list[OutboxEntry]:
        rows = self._exec("pending_outbox").fetchall()
        return [
            OutboxEntry(kind, key, bytes(payload), bool(retain), batch)
            for kind, key, payload, retain, batch in rows
        ]


def make_engine(url: str, *, background_checkpoints: bool = False) -> Engine:
    """An engine for the URL; SQLite gets WAL, real savepoints and BEGIN IMMEDIATE.

    `background_checkpoints` (SQLite files): a thread copies the WAL into the database every half
    second, instead of whichever commit crosses 1,000 pages doing it while the bridge waits; at
    500 msg/s that commit was the slowest 1 % (bench/throughput.py: p99 3.4 -> 2.2 ms).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        database = engine.url.database
        checkpointing = background_checkpoints and bool(database) and database != ":memory:"

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN/SAVEPOINT reach SQLite as written
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # The journal of a transaction's savepoints (one per command) stays in memory instead of
            # spilling into a temporary file once it outgrows 64 KiB (large batches, long bodies).
            cur.execute("PRAGMA temp_store=MEMORY")
            if checkpointing:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

        if checkpointing:
            assert database is not None
            threading.Thread(
                target=_checkpoints,
                args=(database, weakref.ref(engine)),
                name="sqlite-checkpoints",
                daemon=True,
            ).start()
        return engine
    # No pool_pre_ping (a round trip per transaction): a connection found dead is invalidated by the
    # store and the bridge retries at once on a fresh one (Pipeline._retrying).
    return create_engine(url)


def _checkpoints(path: str, engine: weakref.ref[Engine], every: float = 0.5) -> None:
    """Checkpoints the WAL of `path` on a connection of its own (PASSIVE: never blocks a writer), for as
    long as the engine lives."""
    conn: sqlite3.Connection | None = None
    while engine() is not None:
        try:
            if conn is None:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            _busy, log_frames, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if log_frames == -1:  # opened before the file was switched to WAL: open it again
                conn.close()
                conn = None
        except sqlite3.Error:
            log.warning("WAL checkpoint of %s failed; retrying", path, exc_info=True)
        time.sleep(every)
    if conn is not None:
        conn.close()


class SqlUnitOfWork:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements = prepare(engine.dialect)

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """A transaction on a pooled driver connection, begun and ended by hand: `engine.begin()`
        cost about 100 µs per transaction, as much as the rest of a one-message batch."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            conn = self.engine.raw_connection()
        except dbapi_error as exc:  # unreachable: an outage
            raise StorageUnavailable(str(exc), connection_lost=True) from None
        store = SqlStore(conn, self.engine.dialect, self.statements)
        try:
            if self.engine.dialect.name == "sqlite":
                store._run("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
            yield store
            try:
                conn.commit()
            except self.engine.dialect.loaded_dbapi.Error as exc:
                raise store.translate(exc, "COMMIT") from None
        except BaseException:
            if conn.is_valid:
                try:
                    conn.rollback()
                except self.engine.dialect.loaded_dbapi.Error as exc:
                    store.translate(exc, "ROLLBACK")
            raise
        finally:
            conn.close()  # back to the pool

    @contextmanager
    def reading(self) -> Iterator[Store]:
        """Reads without a write lock (SQLite: no BEGIN IMMEDIATE); whatever was done is rolled back."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            conn = self.engine.raw_connection()
        except dbapi_error as exc:
            raise StorageUnavailable(str(exc), connection_lost=True) from None
        store = SqlStore(conn, self.engine.dialect, self.statements)
        try:
            yield store
        finally:
            if conn.is_valid:
                try:
                    conn.rollback()
                except dbapi_error as exc:
                    store.translate(exc, "ROLLBACK")
            conn.close()


MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def migrate(engine: Engine, revision: str = "head") -> None:
    """Brings the schema to `revision` with the Alembic migrations shipped in the package."""
    from alembic import command
    from alembic.config import Config

    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        tables = inspect(conn).get_table_names()
        if "messages" in tables and "alembic_version" not in tables:
            command.stamp(config, "0001")  # created by create_all before migrations existed
        command.upgrade(config, revision)


def init_db(engine: Engine, now_ms: int) -> None:
    """Migrates the schema to the newest and creates the global conversation when missing."""
    migrate(engine)
    with engine.begin() as conn:
        exists = conn.execute(
            select(conversations.c.conversation_id).where(conversations.c.conversation_id == GLOBAL_ID)
        ).first()
        if exists is None:
            try:
                with conn.begin_nested():
                    conn.execute(
                        insert(conversations).values(
                            conversation_id=GLOBAL_ID, kind="global", created_ms=now_ms, last_seq=0
                        )
                    )
            except IntegrityError:
                pass  # another bridge process created it first


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageUnavailable)
