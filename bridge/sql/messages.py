"""Messages: their place in the conversation (seq, rev), writes, and the history queries.

History queries are keyset queries on (conversation_id, seq) or (conversation_id, rev); no OFFSET.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam as b
from sqlalchemy import func, insert, literal_column, select, update

from ..model import Conflict, Message
from .search import Search
from .statements import Sql
from .tables import (
    MSG_COLS,
    MSG_FIELDS,
    SIMPLE,
    conversations,
    message_of,
    message_values,
    messages,
    search_text,
)

MSG = select(*MSG_COLS)


class Messages(Search):
    NEXT_POSITION = Sql(
        update(conversations)
        .where(conversations.c.conversation_id == b("cid"))
        .values(
            last_seq=conversations.c.last_seq + literal_column("1"),
            last_rev=conversations.c.last_rev + literal_column("1"),
        )
        .returning(conversations.c.last_seq, conversations.c.last_rev)
    )

    def next_position(self, conversation_id: str) -> tuple[int, int]:
        row = self._exec(self.NEXT_POSITION, cid=conversation_id).fetchone()
        if row is None:
            raise LookupError(f"no conversation {conversation_id}")
        return int(row[0]), int(row[1])

    NEXT_REV = Sql(
        update(conversations)
        .where(conversations.c.conversation_id == b("cid"))
        .values(last_rev=conversations.c.last_rev + literal_column("1"))
        .returning(conversations.c.last_rev)
    )

    def next_rev(self, conversation_id: str) -> int:
        row = self._exec(self.NEXT_REV, cid=conversation_id).fetchone()
        if row is None:
            raise LookupError(f"no conversation {conversation_id}")
        return int(row[0])

    INSERT_MESSAGE = Sql(  # with the words for search: a tsvector (PostgreSQL) or the FTS5 row (SQLite)
        lambda dialect: (
            insert(messages)
            .values(
                {"search_vector": func.to_tsvector(SIMPLE, b("words"))}
                if dialect == "postgresql"
                else {"search_rowid": b("search_rowid")}
            )
            .inline()
        ),
        columns=MSG_FIELDS,
    )

    def add_message(self, message: Message) -> None:
        # No savepoint of its own: a Conflict always unwinds through the command's savepoint (atomic()).
        values = message_values(message)
        if self._pg:
            values["words"] = search_text(message)
        else:
            values["search_rowid"] = self._search_row(message)
        self._exec(self.INSERT_MESSAGE, **values)  # Conflict: the client_msg_id (or seq) was taken

    UPDATE_MESSAGE = Sql(
        update(messages)
        .where(messages.c.message_id == b("mid"), messages.c.rev == b("expected_rev"))
        .values({name: b(f"new_{name}") for name in ("body", "edited_ms", "deleted_ms", "reactions", "rev")})
    )

    def update_message(self, message: Message, expected_rev: int) -> None:
        stored = self.get_message(message.message_id)
        values = message_values(message)
        if not self._exec(
            self.UPDATE_MESSAGE,
            mid=message.message_id,
            expected_rev=expected_rev,
            **{f"new_{k}": values[k] for k in ("body", "edited_ms", "deleted_ms", "reactions", "rev")},
        ).rowcount:
            raise Conflict(f"message {message.message_id} changed")
        if stored is not None and (stored.body, stored.deleted_ms) == (message.body, message.deleted_ms):
            return  # the words did not change (a reaction)
        self._reindex(message)

    GET_MESSAGE = Sql(MSG.where(messages.c.message_id == b("mid")))

    def get_message(self, message_id: str) -> Message | None:
        return message_of(self._exec(self.GET_MESSAGE, mid=message_id).fetchone())

    FIND_BY_CLIENT_MSG_ID = Sql(
        MSG.where(
            messages.c.conversation_id == b("cid"),
            messages.c.sender_id == b("sender"),
            messages.c.client_msg_id == b("client_msg_id"),
        )
    )

    def find_by_client_msg_id(
        self, conversation_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None:
        row = self._exec(
            self.FIND_BY_CLIENT_MSG_ID, cid=conversation_id, sender=sender_id, client_msg_id=client_msg_id
        ).fetchone()
        return message_of(row)

    def _messages(self, sql: Sql, /, **params: Any) -> list[Message]:
        return [m for r in self._exec(sql, **params).fetchall() if (m := message_of(r)) is not None]

    MESSAGES_AFTER_SEQ = Sql(
        MSG.where(messages.c.conversation_id == b("cid"), messages.c.seq > b("seq"))
        .order_by(messages.c.seq)
        .limit(b("lim"))
    )

    def messages_after_seq(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        return self._messages(self.MESSAGES_AFTER_SEQ, cid=conversation_id, seq=after_seq, lim=limit)

    # A timestamp becomes a seq cursor: the first message created after it, read from the
    # (conversation_id, created_ms, seq) index; then the usual keyset scan on seq.
    FIRST_SEQ_AFTER_MS = Sql(
        select(messages.c.seq)
        .where(messages.c.conversation_id == b("cid"), messages.c.created_ms > b("ms"))
        .order_by(messages.c.created_ms, messages.c.seq)
        .limit(literal_column("1"))
    )
    MESSAGES_FROM_SEQ_AFTER_MS = Sql(
        MSG.where(
            messages.c.conversation_id == b("cid"),
            messages.c.seq >= b("seq"),
            messages.c.created_ms > b("ms"),
        )
        .order_by(messages.c.seq)
        .limit(b("lim"))
    )

    def messages_after_ms(self, conversation_id: str, after_ms: int, limit: int) -> list[Message]:
        first = self._exec(self.FIRST_SEQ_AFTER_MS, cid=conversation_id, ms=after_ms).fetchone()
        if first is None:
            return []
        return self._messages(
            self.MESSAGES_FROM_SEQ_AFTER_MS, cid=conversation_id, seq=first[0], ms=after_ms, lim=limit
        )

    NEWEST_MESSAGES = Sql(
        MSG.where(messages.c.conversation_id == b("cid")).order_by(messages.c.seq.desc()).limit(b("lim"))
    )
    MESSAGES_BEFORE_SEQ = Sql(
        MSG.where(messages.c.conversation_id == b("cid"), messages.c.seq < b("seq"))
        .order_by(messages.c.seq.desc())
        .limit(b("lim"))
    )

    def messages_before_seq(self, conversation_id: str, before_seq: int | None, limit: int) -> list[Message]:
        if before_seq is None:
            return self._messages(self.NEWEST_MESSAGES, cid=conversation_id, lim=limit)
        return self._messages(self.MESSAGES_BEFORE_SEQ, cid=conversation_id, seq=before_seq, lim=limit)

    MESSAGES_AFTER_REV = Sql(
        MSG.where(messages.c.conversation_id == b("cid"), messages.c.rev > b("rev"))
        .order_by(messages.c.rev)
        .limit(b("lim"))
    )

    def messages_after_rev(self, conversation_id: str, after_rev: int, limit: int) -> list[Message]:
        return self._messages(self.MESSAGES_AFTER_REV, cid=conversation_id, rev=after_rev, lim=limit)
