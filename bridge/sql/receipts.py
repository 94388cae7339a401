"""Read markers: how far each user has read in each conversation (absent means 0)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam as b
from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import ClauseElement

from .base import StoreBase
from .statements import Listed, Sql
from .tables import read_markers


def _upsert_forward(dialect: str) -> ClauseElement:
    """Insert the marker, or move it to `seq` if that is forward: never back."""
    pg = dialect == "postgresql"
    upsert = (postgresql.insert if pg else sqlite.insert)(read_markers).values(
        conversation_id=b("cid"), user_id=b("user_id"), read_seq=b("seq")
    )
    forward = (func.greatest if pg else func.max)(read_markers.c.read_seq, upsert.excluded.read_seq)
    return upsert.on_conflict_do_update(
        index_elements=["conversation_id", "user_id"], set_={"read_seq": forward}
    )


class Receipts(StoreBase):
    READ_SEQ = Sql(
        select(read_markers.c.read_seq).where(
            read_markers.c.conversation_id == b("cid"), read_markers.c.user_id == b("user_id")
        )
    )

    def read_seq(self, conversation_id: str, user_id: str) -> int:
        row = self._exec(self.READ_SEQ, cid=conversation_id, user_id=user_id).fetchone()
        return int(row[0]) if row else 0

    READ_MARKERS = Sql(
        select(read_markers.c.conversation_id, read_markers.c.read_seq).where(
            read_markers.c.user_id == b("user_id")
        )
    )

    def read_markers(self, user_id: str) -> dict[str, int]:
        return {cid: int(seq) for cid, seq in self._exec(self.READ_MARKERS, user_id=user_id).fetchall()}

    SET_READ_SEQ = Sql(_upsert_forward)

    def set_read_seq(self, conversation_id: str, user_id: str, seq: int) -> None:
        self._exec(self.SET_READ_SEQ, cid=conversation_id, user_id=user_id, seq=seq)

    FORGET_READ_MARKERS = Listed(
        lambda values: delete(read_markers).where(
            read_markers.c.user_id == b("user_id"), read_markers.c.conversation_id.in_(values)
        )
    )

    def forget_read_markers(self, conversation_ids: Sequence[str], user_id: str) -> None:
        if conversation_ids:
            self._listed(self.FORGET_READ_MARKERS, conversation_ids, rows=False, user_id=user_id)
