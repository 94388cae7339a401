"""Users and their sessions (MQTT connections)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sqlalchemy import bindparam as b
from sqlalchemy import func, insert, select, update

from ..model import ChatSession, User
from .base import StoreBase
from .statements import IN_CHUNK, Listed, Sql
from .tables import SESSION_COLS, sessions, users


class Users(StoreBase):
    GET_USER = Sql(
        select(users.c.user_id, users.c.display_name, users.c.created_ms).where(
            users.c.user_id == b("user_id")
        )
    )

    def get_user(self, user_id: str) -> User | None:
        row = self._exec(self.GET_USER, user_id=user_id).fetchone()
        return User(*row) if row else None

    UPDATE_USER = Sql(update(users).where(users.c.user_id == b("user_id")).values(display_name=b("name")))
    INSERT_USER = Sql(insert(users).inline(), columns=["user_id", "display_name", "created_ms"])

    def save_user(self, user: User) -> None:
        if self._exec(self.UPDATE_USER, user_id=user.user_id, name=user.display_name).rowcount == 0:
            self._exec(
                self.INSERT_USER,
                user_id=user.user_id,
                display_name=user.display_name,
                created_ms=user.created_ms,
            )

    GET_USERS = Listed(
        lambda values: (
            select(users.c.user_id, users.c.display_name, users.c.created_ms)
            .where(users.c.user_id.in_(values))
            .order_by(users.c.user_id)
        )
    )

    def get_users(self, user_ids: Sequence[str]) -> list[User]:
        if not user_ids:
            return []
        rows = self._listed(self.GET_USERS, user_ids)
        if len(set(user_ids)) > IN_CHUNK:
            rows.sort()  # ordered by user_id within each chunk
        return [User(*r) for r in rows]

    ALL_USER_IDS = Sql(select(users.c.user_id).order_by(users.c.user_id))

    def all_user_ids(self) -> list[str]:
        return [r[0] for r in self._exec(self.ALL_USER_IDS).fetchall()]

    USER_IDS_IGNORING_CASE = Sql(select(users.c.user_id).where(func.lower(users.c.user_id) == b("lowered")))

    def user_ids_ignoring_case(self, user_id: str) -> list[str]:
        rows = self._exec(self.USER_IDS_IGNORING_CASE, lowered=user_id.lower()).fetchall()
        return sorted(r[0] for r in rows)


class Sessions(StoreBase):
    GET_SESSION = Sql(
        select(*SESSION_COLS).where(
            sessions.c.user_id == b("user_id"), sessions.c.session_id == b("session_id")
        )
    )

    def get_session(self, user_id: str, session_id: str) -> ChatSession | None:
        row = self._exec(self.GET_SESSION, user_id=user_id, session_id=session_id).fetchone()
        return ChatSession(*row) if row else None

    UPDATE_SESSION = Sql(  # SET binds take the column names; the WHERE ones may not
        update(sessions).where(sessions.c.user_id == b("uid"), sessions.c.session_id == b("sid")),
        columns=["epoch", "started_ms", "ended_ms"],
    )
    INSERT_SESSION = Sql(
        insert(sessions).inline(), columns=["user_id", "session_id", "epoch", "started_ms", "ended_ms"]
    )

    def save_session(self, s: ChatSession) -> None:
        row = dataclasses.asdict(s)
        if self._exec(self.UPDATE_SESSION, uid=s.user_id, sid=s.session_id, **row).rowcount == 0:
            self._exec(self.INSERT_SESSION, **row)

    HAS_ACTIVE_SESSION = Sql(
        select(sessions.c.session_id)
        .where(sessions.c.user_id == b("user_id"), sessions.c.ended_ms.is_(None))
        .limit(1)
    )

    def has_active_session(self, user_id: str) -> bool:
        return self._exec(self.HAS_ACTIVE_SESSION, user_id=user_id).fetchone() is not None

    ACTIVE_USER_IDS = Sql(
        select(sessions.c.user_id)
        .where(sessions.c.ended_ms.is_(None))
        .distinct()
        .order_by(sessions.c.user_id)
    )

    def active_user_ids(self) -> list[str]:
        return [r[0] for r in self._exec(self.ACTIVE_USER_IDS).fetchall()]

    ACTIVE_SESSIONS_OUTSIDE_EPOCH = Sql(
        select(*SESSION_COLS).where(sessions.c.ended_ms.is_(None), sessions.c.epoch != b("epoch_"))
    )

    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]:
        rows = self._exec(self.ACTIVE_SESSIONS_OUTSIDE_EPOCH, epoch_=epoch).fetchall()
        return [ChatSession(*r) for r in rows]

    WITH_ACTIVE_SESSION = Listed(
        lambda values: (
            select(sessions.c.user_id)
            .where(sessions.c.ended_ms.is_(None), sessions.c.user_id.in_(values))
            .distinct()
        )
    )

    def without_active_session(self, user_ids: Sequence[str]) -> list[str]:
        if not user_ids:
            return []
        if len(user_ids) <= (1 if self._pg else 4):
            # Measured: for a few ids (a direct message's one), a precompiled lookup each beats one IN
            # query on SQLite (calls into the library); on PostgreSQL, where each is a round trip, for one.
            return [u for u in user_ids if not self.has_active_session(u)]
        active = {r[0] for r in self._listed(self.WITH_ACTIVE_SESSION, user_ids)}
        return [u for u in user_ids if u not in active]
