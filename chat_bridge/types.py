"""What the bridge sends, as typed dictionaries (the protocol's objects) and one `Event` class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict, cast


class User(TypedDict):
    user_id: str
    display_name: str | None
    active: bool


class Conversation(TypedDict):
    conversation_id: str
    kind: Literal["global", "direct", "group", "thread"]
    title: str | None
    owner_id: str | None
    participants: list[str]
    parent_conversation_id: str | None
    parent_message_id: str | None
    created_at: str
    last_seq: int
    # protocol 1.1
    read_seq: NotRequired[int]
    unread: NotRequired[int]
    last_rev: NotRequired[int]


class Message(TypedDict):
    message_id: str
    conversation_id: str
    seq: int
    sender_id: str
    body: str
    client_msg_id: str | None
    created_at: str
    # protocol 1.1
    edited_at: NotRequired[str | None]
    deleted_at: NotRequired[str | None]
    reactions: NotRequired[dict[str, list[str]]]
    rev: NotRequired[int]


class Page(TypedDict):
    conversation_id: str
    messages: list[Message]
    has_more: bool


class SearchResults(TypedDict):
    query: str
    messages: list[Message]
    has_more: bool


class Session(TypedDict):
    """The `connected` answer: who we are and what we take part in."""

    user: User
    session_id: str
    conversations: list[Conversation]
    active_users: list[User]


class ReadMarker(TypedDict):
    conversation_id: str
    user_id: str
    read_seq: int


class ReactionChange(TypedDict):
    conversation_id: str
    message_id: str
    emoji: str
    user_id: str
    on: bool
    message: Message


@dataclass(frozen=True)
class Event:
    """One event from the user's inbox (or one the SDK made, see `type`).

    `type` is the protocol's event type, or one of the SDK's own:
    `bridge-status` (the retained bridge/status changed: `data` is its payload),
    `connection-lost` (the MQTT connection dropped; the client reconnects by itself and then
    delivers `connected` again),
    `message-updated` (catch-up found a message that changed while we were away).
    `catch_up` is true on events the SDK made from `get-messages` after a reconnect.
    """

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    event_id: str | None = None
    ts: str | None = None
    catch_up: bool = False

    @property
    def message(self) -> Message | None:
        m = self.data.get("message")
        return cast(Message, m) if isinstance(m, dict) else None

    @property
    def conversation(self) -> Conversation | None:
        c = self.data.get("conversation")
        return cast(Conversation, c) if isinstance(c, dict) else None

    @property
    def conversation_id(self) -> str | None:
        """The conversation this event is about, where it names one."""
        for holder in (self.data, self.message or {}, self.conversation or {}):
            cid = holder.get("conversation_id")
            if isinstance(cid, str):
                return cid
        return None
