"""The transactional outbox: events committed with the changes they report, until the broker has them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam as b
from sqlalchemy import delete, insert, select

from ..model import OutboxEntry
from .base import StoreBase
from .statements import Sql
from .tables import outbox


class Outbox(StoreBase):
    INSERT_OUTBOX = Sql(insert(outbox).inline(), columns=["batch", "kind", "key", "payload", "retain"])

    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            self._many(
                self.INSERT_OUTBOX,
                [
                    {"batch": e.batch, "kind": e.kind, "key": e.key, "payload": e.payload, "retain": e.retain}
                    for e in entries
                ],
            )

    FORGET_OUTBOX = Sql(delete(outbox).where(outbox.c.batch == b("batch")))

    def forget_outbox(self, batches: Sequence[str]) -> None:
        if batches:
            self._many(self.FORGET_OUTBOX, [{"batch": batch} for batch in batches])

    PENDING_OUTBOX = Sql(
        select(outbox.c.kind, outbox.c.key, outbox.c.payload, outbox.c.retain, outbox.c.batch).order_by(
            outbox.c.id
        )
    )

    def pending_outbox(self) -> list[OutboxEntry]:
        rows = self._exec(self.PENDING_OUTBOX).fetchall()
        return [
            OutboxEntry(kind, key, bytes(payload), bool(retain), batch)
            for kind, key, payload, retain, batch in rows
        ]
