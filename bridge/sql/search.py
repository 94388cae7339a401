"""Search: the index of messages' words, kept in step with them, and the queries on it.

SQLite links each message to its row of the FTS5 table `message_search` (messages.search_rowid, NULL
when it has no words or is deleted); PostgreSQL keeps the words' tsvector in messages.search_vector,
under a GIN index. Both index `model.words(body)`, so they agree on what a word is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import bindparam, func, select, text, tuple_, update
from sqlalchemy import bindparam as b

from ..model import Message
from .base import StoreBase
from .statements import Sql
from .tables import MSG_COLS, MSG_FIELDS, SIMPLE, message_of, messages, search_text


class Search(StoreBase):
    """SQLite: a message's FTS5 row is written at the end of the transaction, not by the command that
    stores the message. FTS5 writes what it holds in memory to disk at every savepoint once it has been
    written to in the transaction, and each command runs in a savepoint of its own: one FTS5 row per
    command was a segment written per message, a third of a chat message's SQL time. The rows wait in
    `_search_rows` until `flush_search` (before any statement on `message_search`, and before the
    commit); a savepoint rolled back drops the rows of its commands (`atomic`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._search_rows: list[tuple[int, str]] = []  # (rowid, words) of this transaction, in order
        self._search_flushed = 0  # how many of them are in message_search
        self._search_next: dict[int, int] = {}  # per millisecond (rowid >> 12): the next free rowid

    # The FTS5 rowid orders search results: created_ms * 4096 + the order of insertion within that
    # millisecond, so that the newest first is a backwards walk of the index that stops at the limit.
    NEXT_SEARCH_ROWID = Sql(
        text(
            "SELECT coalesce(max(rowid) + 1, :lo) FROM message_search WHERE rowid BETWEEN :lo AND :lo + 4095"
        )
    )
    INSERT_SEARCH_ROW = Sql(text("INSERT INTO message_search(rowid, words) VALUES (:rowid, :words)"))

    def _search_row(self, message: Message) -> int | None:
        """SQLite: the rowid of the message's FTS5 row, written by `flush_search` (None when it has no
        words)."""
        found = search_text(message)
        if found is None:
            return None
        lo = message.created_ms << 12
        rowid = self._search_next.get(lo)
        if rowid is None:  # the first of this millisecond in the transaction: after those stored
            rowid = int(self._exec(self.NEXT_SEARCH_ROWID, lo=lo).fetchone()[0])
        self._search_next[lo] = rowid + 1  # a rowid a rolled-back command took stays unused
        self._search_rows.append((rowid, found))
        return rowid

    def flush_search(self) -> None:
        """Writes the FTS5 rows still waiting, in one statement."""
        if self._search_flushed < len(self._search_rows):
            waiting = self._search_rows[self._search_flushed :]
            self._many(self.INSERT_SEARCH_ROW, [{"rowid": r, "words": w} for r, w in waiting])
            self._search_flushed = len(self._search_rows)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        rows, flushed = len(self._search_rows), self._search_flushed
        try:
            with super().atomic():
                yield
        except BaseException:
            # rolled back: the commands' own rows are gone, and so are those written since it began
            self._search_flushed = min(self._search_flushed, flushed)
            del self._search_rows[rows:]
            raise

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
        self.flush_search()
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
        self.flush_search()
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
