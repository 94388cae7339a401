"""Search: the index of messages' words, kept in step with them, and the queries on it.

SQLite links each message to its row of the FTS5 table `message_search` (messages.search_rowid, NULL
when it has no words or is deleted); PostgreSQL keeps the words' tsvector in messages.search_vector,
under a GIN index. Both index `model.words(body)`, so they agree on what a word is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, func, select, text, tuple_, update
from sqlalchemy import bindparam as b

from ..model import Message
from .base import StoreBase
from .statements import Sql
from .tables import MSG_COLS, MSG_FIELDS, SIMPLE, message_of, messages, search_text


class Search(StoreBase):
    # SQLite's FTS5 rows (PostgreSQL's index follows the column). The FTS5 rowid orders search results:
    # created_ms * 4096 + the order of insertion within that millisecond, so that the newest first is a
    # backwards walk of the index that stops at the limit.
    INSERT_SEARCH_ROW = Sql(
        text(
            "INSERT INTO message_search(rowid, words) VALUES (coalesce((SELECT max(rowid) + 1 FROM "
            "message_search WHERE rowid BETWEEN :lo AND :lo + 4095), :lo), :words)"
        )
    )

    def _search_row(self, message: Message) -> int | None:
        """SQLite: the new FTS5 row of the message's words (None when it has none)."""
        found = search_text(message)
        if found is None:
            return None
        return int(self._exec(self.INSERT_SEARCH_ROW, words=found, lo=message.created_ms << 12).lastrowid)

    UPDATE_MESSAGE_SEARCH = Sql(
        lambda dialect: (
            update(messages)
            .where(messages.c.message_id == b("mid"))
            .values(
                {"search_vector": func.to_tsvector(SIMPLE, b("words"))}
                if dialect == "postgresql"
                else {"search_rowid": b("search_rowid")}
            )
        )
    )
    SEARCH_ROWID_OF = Sql(select(messages.c.search_rowid).where(messages.c.message_id == b("mid")))
    UPDATE_SEARCH_ROW = Sql(text("UPDATE message_search SET words = :words WHERE rowid = :rowid"))
    DELETE_SEARCH_ROW = Sql(text("DELETE FROM message_search WHERE rowid = :rowid"))

    def _reindex(self, message: Message) -> None:
        """The message's words indexed anew. SQLite: its FTS5 row follows its words, keeping its place
        (rowid) in the order."""
        if self._pg:
            self._exec(self.UPDATE_MESSAGE_SEARCH, mid=message.message_id, words=search_text(message))
            return
        row = self._exec(self.SEARCH_ROWID_OF, mid=message.message_id).fetchone()
        rowid, found = (row[0] if row else None), search_text(message)
        if rowid is not None and found is not None:
            self._exec(self.UPDATE_SEARCH_ROW, rowid=rowid, words=found)
        elif rowid is not None:
            self._exec(self.DELETE_SEARCH_ROW, rowid=rowid)
            self._exec(self.UPDATE_MESSAGE_SEARCH, mid=message.message_id, search_rowid=None)
        elif found is not None:
            new = self._search_row(message)
            self._exec(self.UPDATE_MESSAGE_SEARCH, mid=message.message_id, search_rowid=new)

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
        stmt = select(*MSG_COLS).where(
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
        return [m for r in self._core(stmt).fetchall() if (m := message_of(r)) is not None]

    def _search_fts5(
        self, conversation_ids: Sequence[str], query_words: Sequence[str], before: Message | None, limit: int
    ) -> list[Message]:
        """Walks the FTS5 matches from the newest (highest rowid: see INSERT_SEARCH_ROW) and stops at
        the limit: the FTS table drives the join (CROSS JOIN), each match one lookup in messages. Ties
        within a millisecond come in the order they were stored."""
        fts = " ".join(f'"{w}"' for w in query_words)  # words are letters and digits: nothing to escape
        columns = ", ".join(f"m.{name}" for name in MSG_FIELDS)
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
        return [m for r in self._core(stmt).fetchall() if (m := message_of(r)) is not None]
