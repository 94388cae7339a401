"""Conversations and who takes part in them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam as b
from sqlalchemy import delete, func, insert, select, text

from ..model import GLOBAL_ID, Conversation
from .base import StoreBase
from .statements import Listed, Sql
from .tables import (
    CONV_COLS,
    conversation_of,
    conversations,
    messages,
    participants,
    read_markers,
    sessions,
)

CONV = select(*CONV_COLS)


class Conversations(StoreBase):
    GET_CONVERSATION = Sql(CONV.where(conversations.c.conversation_id == b("cid")))

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        return conversation_of(self._exec(self.GET_CONVERSATION, cid=conversation_id).fetchone())

    FIND_DIRECT = Sql(CONV.where(conversations.c.direct_key == b("key")))

    def find_direct(self, key: str) -> Conversation | None:
        return conversation_of(self._exec(self.FIND_DIRECT, key=key).fetchone())

    FIND_THREAD = Sql(CONV.where(conversations.c.parent_message_id == b("mid")))

    def find_thread(self, parent_message_id: str) -> Conversation | None:
        return conversation_of(self._exec(self.FIND_THREAD, mid=parent_message_id).fetchone())

    INSERT_CONVERSATION = Sql(
        insert(conversations).inline(), columns=[c.name for c in CONV_COLS] + ["direct_key"]
    )

    def add_conversation(
        self, conversation: Conversation, participants_: Sequence[str], direct_key: str | None = None
    ) -> None:
        values = {col.name: getattr(conversation, col.name) for col in CONV_COLS}
        self._exec(self.INSERT_CONVERSATION, direct_key=direct_key, **values)  # Conflict: a twin exists
        self.add_participants(conversation.conversation_id, participants_)

    PARTICIPANT_IDS = Sql(
        select(participants.c.user_id)
        .where(participants.c.conversation_id == b("cid"))
        .order_by(participants.c.user_id)
    )

    def participant_ids(self, conversation_id: str) -> list[str]:
        return [r[0] for r in self._exec(self.PARTICIPANT_IDS, cid=conversation_id).fetchall()]

    PARTICIPANTS_ONLINE = Sql(
        select(
            participants.c.user_id,
            select(sessions.c.session_id)
            .where(sessions.c.user_id == participants.c.user_id, sessions.c.ended_ms.is_(None))
            .exists(),
        )
        .where(participants.c.conversation_id == b("cid"))
        .order_by(participants.c.user_id)
    )

    def participants_online(self, conversation_id: str) -> list[tuple[str, bool]]:
        rows = self._exec(self.PARTICIPANTS_ONLINE, cid=conversation_id).fetchall()
        return [(user_id, bool(online)) for user_id, online in rows]

    IS_PARTICIPANT = Sql(
        select(participants.c.user_id).where(
            participants.c.conversation_id == b("cid"), participants.c.user_id == b("user_id")
        )
    )

    def is_participant(self, conversation_id: str, user_id: str) -> bool:
        return self._exec(self.IS_PARTICIPANT, cid=conversation_id, user_id=user_id).fetchone() is not None

    INSERT_PARTICIPANT = Sql(insert(participants).inline(), columns=["conversation_id", "user_id"])

    def add_participants(self, conversation_id: str, user_ids: Sequence[str]) -> None:
        if user_ids:
            self._many(
                self.INSERT_PARTICIPANT,
                [{"conversation_id": conversation_id, "user_id": u} for u in user_ids],
            )

    REMOVE_PARTICIPANT = Sql(
        delete(participants).where(
            participants.c.conversation_id == b("cid"), participants.c.user_id == b("user_id")
        )
    )

    def remove_participant(self, conversation_id: str, user_id: str) -> None:
        self._exec(self.REMOVE_PARTICIPANT, cid=conversation_id, user_id=user_id)

    _MINE = select(participants.c.conversation_id).where(participants.c.user_id == b("user_id"))
    CONVERSATIONS_OF = Sql(
        CONV.where(
            conversations.c.conversation_id.in_(_MINE)
            | conversations.c.parent_conversation_id.in_(_MINE)
            | (conversations.c.parent_conversation_id == GLOBAL_ID)
        ).order_by(conversations.c.created_ms, conversations.c.conversation_id)
    )

    def conversations_of(self, user_id: str) -> list[Conversation]:
        return [Conversation(*r) for r in self._exec(self.CONVERSATIONS_OF, user_id=user_id).fetchall()]

    MEMBERSHIP_COUNTS = Listed(
        lambda values: (
            select(participants.c.user_id, func.count())
            .where(participants.c.user_id.in_(values))
            .group_by(participants.c.user_id)
        )
    )

    def membership_counts(self, user_ids: Sequence[str]) -> dict[str, int]:
        if not user_ids:
            return {}
        return {user_id: count for user_id, count in self._listed(self.MEMBERSHIP_COUNTS, user_ids)}

    THREADS_OF = Sql(CONV.where(conversations.c.parent_conversation_id == b("cid")))

    def threads_of(self, conversation_id: str) -> list[Conversation]:
        return [Conversation(*r) for r in self._exec(self.THREADS_OF, cid=conversation_id).fetchall()]

    DELETE_SEARCH_ROWS = Sql(  # SQLite's FTS5 rows of the conversation's messages
        text(
            "DELETE FROM message_search WHERE rowid IN "
            "(SELECT search_rowid FROM messages WHERE conversation_id = :cid)"
        )
    )
    DELETE_READ_MARKERS = Sql(delete(read_markers).where(read_markers.c.conversation_id == b("cid")))
    DELETE_MESSAGES = Sql(delete(messages).where(messages.c.conversation_id == b("cid")))
    DELETE_PARTICIPANTS = Sql(delete(participants).where(participants.c.conversation_id == b("cid")))
    DELETE_CONVERSATION = Sql(delete(conversations).where(conversations.c.conversation_id == b("cid")))

    def delete_conversation(self, conversation_id: str) -> None:
        steps = [
            self.DELETE_READ_MARKERS,
            self.DELETE_MESSAGES,
            self.DELETE_PARTICIPANTS,
            self.DELETE_CONVERSATION,
        ]
        if not self._pg:
            self.flush_search()  # the rows of this transaction's messages, too
            steps.insert(0, self.DELETE_SEARCH_ROWS)
        for sql in steps:
            self._exec(sql, cid=conversation_id)
