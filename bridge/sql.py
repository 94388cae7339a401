"""The SQL store: SQLModel tables, queried with SQLAlchemy Core on one connection per transaction.

SQLite (a file in WAL mode) by default, PostgreSQL in production. History
queries are keyset queries on (conversation_id, seq); there is no OFFSET.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    delete,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlmodel import Field, SQLModel, create_engine

from .model import GLOBAL_ID, ChatSession, Conflict, Conversation, Message, OutboxEntry, Store, User

log = logging.getLogger(__name__)

# Errors that mean "the database is unreachable": the batch is retried, never answered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


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
    )
    message_id: str = Field(primary_key=True, max_length=64)
    conversation_id: str = Field(max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    sender_id: str = Field(max_length=64)
    body: str = Field(sa_column=Column(Text, nullable=False))
    client_msg_id: str | None = Field(default=None, max_length=64)
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


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

_CONV_COLS = (
    conversations.c.conversation_id,
    conversations.c.kind,
    conversations.c.title,
    conversations.c.owner_id,
    conversations.c.parent_conversation_id,
    conversations.c.parent_message_id,
    conversations.c.created_ms,
    conversations.c.last_seq,
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
)


def _conv(row: Any) -> Conversation | None:
    return Conversation(**row._mapping) if row is not None else None


def _msgs(rows: Sequence[Any]) -> list[Message]:
    return [Message(**r._mapping) for r in rows]


class SqlStore:
    """A Store bound to one connection with an open transaction."""

    def __init__(self, conn: Connection) -> None:
        self.c = conn

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self.c.begin_nested():
            yield

    # users
    def get_user(self, user_id: str) -> User | None:
        row = self.c.execute(
            select(users.c.user_id, users.c.display_name, users.c.created_ms).where(
                users.c.user_id == user_id
            )
        ).first()
        return User(*row) if row else None

    def save_user(self, user: User) -> None:
        done = self.c.execute(
            update(users).where(users.c.user_id == user.user_id).values(display_name=user.display_name)
        )
        if done.rowcount == 0:
            self.c.execute(
                insert(users).values(
                    user_id=user.user_id, display_name=user.display_name, created_ms=user.created_ms
                )
            )

    def get_users(self, user_ids: Sequence[str]) -> list[User]:
        if not user_ids:
            return []
        rows = self.c.execute(
            select(users.c.user_id, users.c.display_name, users.c.created_ms)
            .where(users.c.user_id.in_(set(user_ids)))
            .order_by(users.c.user_id)
        ).all()
        return [User(*r) for r in rows]

    def all_user_ids(self) -> list[str]:
        return list(self.c.execute(select(users.c.user_id).order_by(users.c.user_id)).scalars())

    # sessions
    def get_session(self, user_id: str, session_id: str) -> ChatSession | None:
        row = self.c.execute(
            select(*_SESSION_COLS).where(sessions.c.user_id == user_id, sessions.c.session_id == session_id)
        ).first()
        return ChatSession(*row) if row else None

    def save_session(self, session: ChatSession) -> None:
        values = {"epoch": session.epoch, "started_ms": session.started_ms, "ended_ms": session.ended_ms}
        done = self.c.execute(
            update(sessions)
            .where(sessions.c.user_id == session.user_id, sessions.c.session_id == session.session_id)
            .values(**values)
        )
        if done.rowcount == 0:
            self.c.execute(
                insert(sessions).values(user_id=session.user_id, session_id=session.session_id, **values)
            )

    def has_active_session(self, user_id: str) -> bool:
        row = self.c.execute(
            select(sessions.c.session_id)
            .where(sessions.c.user_id == user_id, sessions.c.ended_ms.is_(None))
            .limit(1)
        ).first()
        return row is not None

    def active_user_ids(self) -> list[str]:
        return list(
            self.c.execute(
                select(sessions.c.user_id)
                .where(sessions.c.ended_ms.is_(None))
                .distinct()
                .order_by(sessions.c.user_id)
            ).scalars()
        )

    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]:
        rows = self.c.execute(
            select(*_SESSION_COLS).where(sessions.c.ended_ms.is_(None), sessions.c.epoch != epoch)
        ).all()
        return [ChatSession(*r) for r in rows]

    # conversations
    def get_conversation(self, conversation_id: str) -> Conversation | None:
        return _conv(
            self.c.execute(
                select(*_CONV_COLS).where(conversations.c.conversation_id == conversation_id)
            ).first()
        )

    def find_direct(self, key: str) -> Conversation | None:
        return _conv(self.c.execute(select(*_CONV_COLS).where(conversations.c.direct_key == key)).first())

    def find_thread(self, parent_message_id: str) -> Conversation | None:
        return _conv(
            self.c.execute(
                select(*_CONV_COLS).where(conversations.c.parent_message_id == parent_message_id)
            ).first()
        )

    def add_conversation(
        self, conversation: Conversation, participants_: Sequence[str], direct_key: str | None = None
    ) -> None:
        values = {col.name: getattr(conversation, col.name) for col in _CONV_COLS}
        try:
            self.c.execute(insert(conversations).values(direct_key=direct_key, **values))
        except IntegrityError as exc:
            raise Conflict(str(exc.orig)) from None
        if participants_:
            self.c.execute(
                insert(participants),
                [{"conversation_id": conversation.conversation_id, "user_id": u} for u in participants_],
            )

    def participant_ids(self, conversation_id: str) -> list[str]:
        return list(
            self.c.execute(
                select(participants.c.user_id)
                .where(participants.c.conversation_id == conversation_id)
                .order_by(participants.c.user_id)
            ).scalars()
        )

    def is_participant(self, conversation_id: str, user_id: str) -> bool:
        return (
            self.c.execute(
                select(participants.c.user_id).where(
                    participants.c.conversation_id == conversation_id, participants.c.user_id == user_id
                )
            ).first()
            is not None
        )

    def add_participants(self, conversation_id: str, user_ids: Sequence[str]) -> None:
        self.c.execute(
            insert(participants), [{"conversation_id": conversation_id, "user_id": u} for u in user_ids]
        )

    def remove_participant(self, conversation_id: str, user_id: str) -> None:
        self.c.execute(
            delete(participants).where(
                participants.c.conversation_id == conversation_id, participants.c.user_id == user_id
            )
        )

    def conversations_of(self, user_id: str) -> list[Conversation]:
        mine = select(participants.c.conversation_id).where(participants.c.user_id == user_id)
        rows = self.c.execute(
            select(*_CONV_COLS)
            .where(
                conversations.c.conversation_id.in_(mine)
                | conversations.c.parent_conversation_id.in_(mine)
                | (conversations.c.parent_conversation_id == GLOBAL_ID)
            )
            .order_by(conversations.c.created_ms, conversations.c.conversation_id)
        ).all()
        return [Conversation(**r._mapping) for r in rows]

    def threads_of(self, conversation_id: str) -> list[Conversation]:
        rows = self.c.execute(
            select(*_CONV_COLS).where(conversations.c.parent_conversation_id == conversation_id)
        ).all()
        return [Conversation(**r._mapping) for r in rows]

    def delete_conversation(self, conversation_id: str) -> None:
        self.c.execute(delete(messages).where(messages.c.conversation_id == conversation_id))
        self.c.execute(delete(participants).where(participants.c.conversation_id == conversation_id))
        self.c.execute(delete(conversations).where(conversations.c.conversation_id == conversation_id))

    # messages
    def next_seq(self, conversation_id: str) -> int:
        seq = self.c.execute(
            update(conversations)
            .where(conversations.c.conversation_id == conversation_id)
            .values(last_seq=conversations.c.last_seq + 1)
            .returning(conversations.c.last_seq)
        ).scalar_one()
        return int(seq)

    def add_message(self, message: Message) -> None:
        # No savepoint of its own: a Conflict always unwinds through the command's savepoint (atomic()).
        try:
            self.c.execute(
                insert(messages).values(**{col.name: getattr(message, col.name) for col in _MSG_COLS})
            )
        except IntegrityError as exc:
            raise Conflict(str(exc.orig)) from None

    def get_message(self, message_id: str) -> Message | None:
        row = self.c.execute(select(*_MSG_COLS).where(messages.c.message_id == message_id)).first()
        return Message(*row) if row else None

    def find_by_client_msg_id(
        self, conversation_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None:
        row = self.c.execute(
            select(*_MSG_COLS).where(
                messages.c.conversation_id == conversation_id,
                messages.c.sender_id == sender_id,
                messages.c.client_msg_id == client_msg_id,
            )
        ).first()
        return Message(*row) if row else None

    def messages_after_seq(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        return _msgs(
            self.c.execute(
                select(*_MSG_COLS)
                .where(messages.c.conversation_id == conversation_id, messages.c.seq > after_seq)
                .order_by(messages.c.seq)
                .limit(limit)
            ).all()
        )

    def messages_after_ms(self, conversation_id: str, after_ms: int, limit: int) -> list[Message]:
        # The timestamp becomes a seq cursor: the first message created after it, read from the
        # (conversation_id, created_ms, seq) index; then the usual keyset scan on seq.
        first = self.c.execute(
            select(messages.c.seq)
            .where(messages.c.conversation_id == conversation_id, messages.c.created_ms > after_ms)
            .order_by(messages.c.created_ms, messages.c.seq)
            .limit(1)
        ).scalar()
        if first is None:
            return []
        return _msgs(
            self.c.execute(
                select(*_MSG_COLS)
                .where(
                    messages.c.conversation_id == conversation_id,
                    messages.c.seq >= first,
                    messages.c.created_ms > after_ms,
                )
                .order_by(messages.c.seq)
                .limit(limit)
            ).all()
        )

    def messages_before_seq(self, conversation_id: str, before_seq: int | None, limit: int) -> list[Message]:
        query = select(*_MSG_COLS).where(messages.c.conversation_id == conversation_id)
        if before_seq is not None:
            query = query.where(messages.c.seq < before_seq)
        return _msgs(self.c.execute(query.order_by(messages.c.seq.desc()).limit(limit)).all())

    # the transactional outbox
    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            self.c.execute(
                insert(outbox),
                [
                    {"batch": e.batch, "kind": e.kind, "key": e.key, "payload": e.payload, "retain": e.retain}
                    for e in entries
                ],
            )

    def forget_outbox(self, batches: Sequence[str]) -> None:
        if batches:
            self.c.execute(delete(outbox).where(outbox.c.batch.in_(list(batches))))

    def pending_outbox(self) -> list[OutboxEntry]:
        rows = self.c.execute(
            select(outbox.c.kind, outbox.c.key, outbox.c.payload, outbox.c.retain, outbox.c.batch).order_by(
                outbox.c.id
            )
        ).all()
        return [OutboxEntry(r.kind, r.key, bytes(r.payload), bool(r.retain), r.batch) for r in rows]


def make_engine(url: str) -> Engine:
    """An engine for the URL; SQLite gets WAL, real savepoints and BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN/SAVEPOINT reach SQLite as written
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

        return engine
    return create_engine(url, pool_pre_ping=True)


class SqlUnitOfWork:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        with self.engine.begin() as conn:
            yield SqlStore(conn)


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
    return isinstance(exc, TRANSIENT_ERRORS) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
