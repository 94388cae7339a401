"""The in-memory twin of the SQL store, for unit tests and property tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .model import (
    GLOBAL_ID,
    ChatSession,
    Conflict,
    Conversation,
    Message,
    OutboxEntry,
    Store,
    User,
    words,
)


@dataclass
class _State:
    users: dict[str, User] = field(default_factory=dict)
    sessions: dict[tuple[str, str], ChatSession] = field(default_factory=dict)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    participants: dict[str, set[str]] = field(default_factory=dict)
    direct_keys: dict[str, str] = field(default_factory=dict)
    threads: dict[str, str] = field(default_factory=dict)  # root message id -> thread id
    messages: dict[str, list[Message]] = field(default_factory=dict)
    message_index: dict[str, Message] = field(default_factory=dict)
    client_ids: dict[tuple[str, str, str], Message] = field(default_factory=dict)
    outbox: list[OutboxEntry] = field(default_factory=list)
    read_markers: dict[tuple[str, str], int] = field(default_factory=dict)  # (conversation, user) -> seq


def _savepoint(state: _State) -> _State:
    """A copy of the state to roll back to. As good as a deep copy, and much faster: every container
    is copied, while what they hold is shared, since it is never changed in place (frozen dataclasses
    of strings, numbers and tuples; strings; numbers)."""

    def copied(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: copied(v) for k, v in value.items()}
        if isinstance(value, list | set):
            return type(value)(copied(v) for v in value)
        return value

    return _State(**{f.name: copied(getattr(state, f.name)) for f in fields(_State)})


class MemoryStore:
    def __init__(self, created_ms: int = 0) -> None:
        self._s = _State()
        self._s.conversations[GLOBAL_ID] = Conversation(
            GLOBAL_ID, "global", None, None, None, None, created_ms
        )
        self._s.messages[GLOBAL_ID] = []

    @contextmanager
    def atomic(self) -> Iterator[None]:
        outbox, self._s.outbox = self._s.outbox, []  # append-only: a rollback truncates it, no copy needed
        saved = _savepoint(self._s)
        self._s.outbox = outbox
        length = len(outbox)
        try:
            yield
        except BaseException:
            del outbox[length:]
            saved.outbox = outbox
            self._s = saved
            raise

    # users
    def get_user(self, user_id: str) -> User | None:
        return self._s.users.get(user_id)

    def save_user(self, user: User) -> None:
        self._s.users[user.user_id] = user

    def get_users(self, user_ids: Sequence[str]) -> list[User]:
        return sorted((u for i in set(user_ids) if (u := self._s.users.get(i))), key=lambda u: u.user_id)

    def all_user_ids(self) -> list[str]:
        return sorted(self._s.users)

    def user_ids_ignoring_case(self, user_id: str) -> list[str]:
        return sorted(u for u in self._s.users if u.lower() == user_id.lower())

    # sessions
    def get_session(self, user_id: str, session_id: str) -> ChatSession | None:
        return self._s.sessions.get((user_id, session_id))

    def save_session(self, session: ChatSession) -> None:
        self._s.sessions[(session.user_id, session.session_id)] = session

    def has_active_session(self, user_id: str) -> bool:
        return any(s.active and s.user_id == user_id for s in self._s.sessions.values())

    def active_user_ids(self) -> list[str]:
        return sorted({s.user_id for s in self._s.sessions.values() if s.active})

    def active_sessions_outside_epoch(self, epoch: str) -> list[ChatSession]:
        return [s for s in self._s.sessions.values() if s.active and s.epoch != epoch]

    def without_active_session(self, user_ids: Sequence[str]) -> list[str]:
        active = {s.user_id for s in self._s.sessions.values() if s.active}
        return [u for u in user_ids if u not in active]

    # conversations
    def get_conversation(self, conversation_id: str) -> Conversation | None:
        return self._s.conversations.get(conversation_id)

    def find_direct(self, key: str) -> Conversation | None:
        cid = self._s.direct_keys.get(key)
        return self._s.conversations.get(cid) if cid else None

    def find_thread(self, parent_message_id: str) -> Conversation | None:
        cid = self._s.threads.get(parent_message_id)
        return self._s.conversations.get(cid) if cid else None

    def add_conversation(
        self, conversation: Conversation, participants: Sequence[str], direct_key: str | None = None
    ) -> None:
        if direct_key is not None and direct_key in self._s.direct_keys:
            raise Conflict(f"direct conversation {direct_key} exists")
        root = conversation.parent_message_id
        if root is not None and root in self._s.threads:
            raise Conflict(f"message {root} has a thread")
        cid = conversation.conversation_id
        self._s.conversations[cid] = conversation
        self._s.participants[cid] = set(participants)
        self._s.messages[cid] = []
        if direct_key is not None:
            self._s.direct_keys[direct_key] = cid
        if root is not None:
            self._s.threads[root] = cid

    def participant_ids(self, conversation_id: str) -> list[str]:
        return sorted(self._s.participants.get(conversation_id, ()))

    def participants_online(self, conversation_id: str) -> list[tuple[str, bool]]:
        active = {s.user_id for s in self._s.sessions.values() if s.active}
        return [(u, u in active) for u in self.participant_ids(conversation_id)]

    def is_participant(self, conversation_id: str, user_id: str) -> bool:
        return user_id in self._s.participants.get(conversation_id, ())

    def add_participants(self, conversation_id: str, user_ids: Sequence[str]) -> None:
        self._s.participants[conversation_id].update(user_ids)

    def remove_participant(self, conversation_id: str, user_id: str) -> None:
        self._s.participants[conversation_id].discard(user_id)

    def conversations_of(self, user_id: str) -> list[Conversation]:
        mine = {cid for cid, members in self._s.participants.items() if user_id in members}
        found = [
            c
            for c in self._s.conversations.values()
            if c.conversation_id in mine
            or (
                c.kind == "thread"
                and (c.parent_conversation_id in mine or c.parent_conversation_id == GLOBAL_ID)
            )
        ]
        return sorted(found, key=lambda c: (c.created_ms, c.conversation_id))

    def membership_counts(self, user_ids: Sequence[str]) -> dict[str, int]:
        wanted, counts = set(user_ids), dict[str, int]()
        for members in self._s.participants.values():
            for u in wanted & members:
                counts[u] = counts.get(u, 0) + 1
        return counts

    def threads_of(self, conversation_id: str) -> list[Conversation]:
        return [c for c in self._s.conversations.values() if c.parent_conversation_id == conversation_id]

    def delete_conversation(self, conversation_id: str) -> None:
        s = self._s
        conv = s.conversations.pop(conversation_id)
        s.participants.pop(conversation_id, None)
        for m in s.messages.pop(conversation_id, []):
            s.message_index.pop(m.message_id, None)
            if m.client_msg_id is not None:
                s.client_ids.pop((conversation_id, m.sender_id, m.client_msg_id), None)
        s.read_markers = {k: v for k, v in s.read_markers.items() if k[0] != conversation_id}
        s.direct_keys = {k: v for k, v in s.direct_keys.items() if v != conversation_id}
        if conv.parent_message_id is not None:
            s.threads.pop(conv.parent_message_id, None)

    # messages
    def next_position(self, conversation_id: str) -> tuple[int, int]:
        conv = self._s.conversations[conversation_id]
        self._s.conversations[conversation_id] = replace(
            conv, last_seq=conv.last_seq + 1, last_rev=conv.last_rev + 1
        )
        return conv.last_seq + 1, conv.last_rev + 1

    def next_rev(self, conversation_id: str) -> int:
        conv = self._s.conversations[conversation_id]
        self._s.conversations[conversation_id] = replace(conv, last_rev=conv.last_rev + 1)
        return conv.last_rev + 1

    def add_message(self, message: Message) -> None:
        s = self._s
        if message.client_msg_id is not None:
            key = (message.conversation_id, message.sender_id, message.client_msg_id)
            if key in s.client_ids:
                raise Conflict(f"client_msg_id {message.client_msg_id} used")
            s.client_ids[key] = message
        s.messages[message.conversation_id].append(message)
        s.message_index[message.message_id] = message

    def update_message(self, message: Message, expected_rev: int) -> None:
        s = self._s
        stored = s.message_index[message.message_id]
        if stored.rev != expected_rev:
            raise Conflict(f"message {message.message_id} changed")
        rows = s.messages[message.conversation_id]
        rows[rows.index(stored)] = message
        s.message_index[message.message_id] = message
        if message.client_msg_id is not None:
            s.client_ids[(message.conversation_id, message.sender_id, message.client_msg_id)] = message

    def get_message(self, message_id: str) -> Message | None:
        return self._s.message_index.get(message_id)

    def find_by_client_msg_id(
        self, conversation_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None:
        return self._s.client_ids.get((conversation_id, sender_id, client_msg_id))

    def messages_after_seq(self, conversation_id: str, after_seq: int, limit: int) -> list[Message]:
        return [m for m in self._s.messages.get(conversation_id, []) if m.seq > after_seq][:limit]

    def messages_after_ms(self, conversation_id: str, after_ms: int, limit: int) -> list[Message]:
        return [m for m in self._s.messages.get(conversation_id, []) if m.created_ms > after_ms][:limit]

    def messages_before_seq(self, conversation_id: str, before_seq: int | None, limit: int) -> list[Message]:
        rows = self._s.messages.get(conversation_id, [])
        if before_seq is not None:
            rows = [m for m in rows if m.seq < before_seq]
        return list(reversed(rows[-limit:])) if limit else []

    def messages_after_rev(self, conversation_id: str, after_rev: int, limit: int) -> list[Message]:
        rows = sorted(
            (m for m in self._s.messages.get(conversation_id, []) if m.rev > after_rev), key=lambda m: m.rev
        )
        return rows[:limit]

    def search(
        self,
        conversation_ids: Sequence[str],
        query_words: Sequence[str],
        before: Message | None,
        limit: int,
    ) -> list[Message]:
        wanted = set(query_words)
        found = [
            m
            for cid in set(conversation_ids)
            for m in self._s.messages.get(cid, [])
            if not m.deleted
            and wanted <= set(words(m.body))
            and (before is None or (m.created_ms, m.message_id) < (before.created_ms, before.message_id))
        ]
        found.sort(key=lambda m: (m.created_ms, m.message_id), reverse=True)
        return found[:limit]

    # read markers
    def read_seq(self, conversation_id: str, user_id: str) -> int:
        return self._s.read_markers.get((conversation_id, user_id), 0)

    def read_markers(self, user_id: str) -> dict[str, int]:
        return {cid: seq for (cid, uid), seq in self._s.read_markers.items() if uid == user_id}

    def set_read_seq(self, conversation_id: str, user_id: str, seq: int) -> None:
        key = (conversation_id, user_id)
        self._s.read_markers[key] = max(seq, self._s.read_markers.get(key, 0))

    def forget_read_markers(self, conversation_ids: Sequence[str], user_id: str) -> None:
        for cid in conversation_ids:
            self._s.read_markers.pop((cid, user_id), None)

    # the transactional outbox
    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        self._s.outbox.extend(entries)

    def forget_outbox(self, batches: Sequence[str]) -> None:
        done = set(batches)
        self._s.outbox = [e for e in self._s.outbox if e.batch not in done]

    def pending_outbox(self) -> list[OutboxEntry]:
        return list(self._s.outbox)


class MemoryUnitOfWork:
    """A UnitOfWork over one MemoryStore; a failed transaction leaves it as it was."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self.transactions = 0  # for tests that check a command needed none
        self.reads = 0

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        self.transactions += 1
        with self.store.atomic():
            yield self.store

    @contextmanager
    def reading(self) -> Iterator[Store]:
        self.reads += 1
        yield self.store
