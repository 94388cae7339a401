"""The wire protocol, version 1: one pydantic model per command and per event.

These classes are the single source of truth for the wire format; `schemas/`
is generated from them (`python -m bridge.schemagen`) and a test fails when
the committed files drift.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .errors import ErrorCode
from .limits import MAX_PAGE

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SEQ = 2**62

UserId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ObjectId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
RequestId = Annotated[str, StringConstraints(max_length=64)]
# Characters a name shown to other people may not hold: control characters (NUL, newlines, escapes),
# line and paragraph separators, bidi overrides, embeddings and isolates (which reorder what follows
# them: spoofed names), and zero-width or blank-looking characters (look-alike names: the combining
# grapheme joiner, Hangul fillers, the braille blank).
_UNSHOWABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2069\u2800\u3164\ufeff\uffa0]"
)


def _showable(value: str) -> str:
    bad = _UNSHOWABLE.search(value)
    if bad is not None:
        raise ValueError(
            f"U+{ord(bad.group()):04X} is not allowed here "
            "(no control, bidi-override or zero-width characters)"
        )
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")  # and PostgreSQL cannot store them
    return value


NoNul = AfterValidator(_no_nul)
Showable = AfterValidator(_showable)
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64), NoNul]
ClientMsgId = Annotated[str, StringConstraints(min_length=1, max_length=64), NoNul]
Body = Annotated[str, StringConstraints(min_length=1, max_length=8000), NoNul]
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=100), Showable]
Title = Annotated[str, StringConstraints(min_length=1, max_length=200), Showable]
# (1.1) 1-16 code points with no whitespace or control characters (checked by the handler)
Emoji = Annotated[str, StringConstraints(min_length=1, max_length=16), NoNul]
SearchQuery = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Timestamp = Annotated[
    str, Field(description="ISO 8601 in UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z")
]
MAX_PARTICIPANTS_PER_COMMAND = 100
Cursor = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100),
    Field(description="the `next` of the previous page, as given (opaque)"),
]
PageLimit = Annotated[int, Field(ge=1, le=MAX_PAGE, description="at most this many items")]


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as the protocol's timestamp."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=256)
def _iso_second(second: int) -> str:
    # Every event carries the time: formatted once per second, not per event.
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def ms_of(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --- commands ---------------------------------------------------------------


class Command(BaseModel):
    """A command: a flat JSON object; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    name: ClassVar[str]
    request_id: RequestId | None = None


class Connect(Command):
    name = "connect"
    session_id: SessionId
    display_name: DisplayName | None = None


class Disconnect(Command):
    name = "disconnect"
    session_id: SessionId
    reason: Literal["client", "lost"] | None = None


class CreateConversation(Command):
    name = "create-conversation"
    kind: Literal["direct", "group"]
    participants: Annotated[list[UserId], Field(min_length=1, max_length=MAX_PARTICIPANTS_PER_COMMAND)]
    title: Title | None = None


class Invite(Command):
    name = "invite"
    conversation_id: ObjectId
    user_ids: Annotated[list[UserId], Field(min_length=1, max_length=MAX_PARTICIPANTS_PER_COMMAND)]


class Leave(Command):
    name = "leave"
    conversation_id: ObjectId


class RemoveConversation(Command):
    name = "remove-conversation"
    conversation_id: ObjectId


class SendMessage(Command):
    name = "send-message"
    conversation_id: ObjectId
    body: Body
    client_msg_id: ClientMsgId | None = None


class Reply(Command):
    name = "reply"
    message_id: ObjectId
    body: Body
    client_msg_id: ClientMsgId | None = None


class GetMessages(Command):
    """Exactly one of `since_seq`, `since` and `since_rev` is required (checked by the handler)."""

    name = "get-messages"
    conversation_id: ObjectId
    since_seq: Seq | None = None
    since: datetime | None = None
    since_rev: Seq | None = Field(
        default=None, description="(1.1) messages new or changed after this rev, in ascending rev"
    )
    limit: Annotated[int, Field(ge=1, le=500)] = 100


class GetPriorMessages(Command):
    name = "get-prior-messages"
    conversation_id: ObjectId
    before_seq: Seq | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class GetConversations(Command):
    """Pages: without `after`, the first page; answers carry `next` while more follow."""

    name = "get-conversations"
    after: Cursor | None = None
    limit: PageLimit = MAX_PAGE


class GetParticipants(Command):
    """Pages, by ascending user id: `after` is the `next` of the previous page."""

    name = "get-participants"
    conversation_id: ObjectId
    after: UserId | None = None
    limit: PageLimit = MAX_PAGE


class GetActiveUsers(Command):
    """Pages, by ascending user id: `after` is the `next` of the previous page."""

    name = "get-active-users"
    after: UserId | None = None
    limit: PageLimit = MAX_PAGE


# --- commands added in 1.1 ---------------------------------------------------------


class MarkRead(Command):
    """Moves the sender's read marker forward; a seq above last_seq is taken as last_seq."""

    name = "mark-read"
    conversation_id: ObjectId
    seq: Seq


class Typing(Command):
    """Ephemeral: relayed at QoS 0 to the other participants, never stored, unanswered when it succeeds."""

    name = "typing"
    conversation_id: ObjectId
    typing: bool


class EditMessage(Command):
    """Only the sender may edit; a deleted message is not-found."""

    name = "edit-message"
    message_id: ObjectId
    body: Body


class DeleteMessage(Command):
    """The sender, or the owner of a group (and of its threads), leaves a tombstone."""

    name = "delete-message"
    message_id: ObjectId


class React(Command):
    """Adds (`on` true) or removes the sender's reaction; asking for the current state changes nothing."""

    name = "react"
    message_id: ObjectId
    emoji: Emoji
    on: bool = True


class SearchMessages(Command):
    """Messages containing every word of the query, newest first, in the sender's conversations."""

    name = "search-messages"
    query: SearchQuery
    conversation_id: ObjectId | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    before_message_id: ObjectId | None = Field(
        default=None,
        description="(extension) the next page: only results older than this one (the last result of "
        "the previous page)",
    )


COMMANDS: dict[str, type[Command]] = {
    cls.name: cls
    for cls in (
        Connect,
        Disconnect,
        CreateConversation,
        Invite,
        Leave,
        RemoveConversation,
        SendMessage,
        Reply,
        GetMessages,
        GetPriorMessages,
        GetConversations,
        GetParticipants,
        GetActiveUsers,
        MarkRead,
        Typing,
        EditMessage,
        DeleteMessage,
        React,
        SearchMessages,
    )
}


# --- objects inside events ----------------------------------------------------


class WireModel(BaseModel):
    model_config = ConfigDict(frozen=True)


class UserOut(WireModel):
    user_id: str
    display_name: str | None
    active: bool


class ConversationOut(WireModel):
    conversation_id: str
    kind: Literal["global", "direct", "group", "thread"]
    title: str | None
    owner_id: str | None
    participants: list[str] = Field(description="user ids; for `global` empty, meaning everyone")
    parent_conversation_id: str | None
    parent_message_id: str | None
    created_at: Timestamp
    last_seq: int
    read_seq: int = Field(
        description="(1.1) the addressed user's read marker, 0 when none (and on the conversation topic)"
    )
    unread: int = Field(description="(1.1) last_seq - read_seq for the addressed user")
    last_rev: int = Field(description="(1.1) the highest rev in the conversation; 0 when empty")


class MessageOut(WireModel):
    message_id: str
    conversation_id: str
    seq: int
    sender_id: str
    body: str = Field(description='"" once deleted')
    client_msg_id: str | None
    created_at: Timestamp
    edited_at: Timestamp | None = Field(description="(1.1) the last edit, null if never")
    deleted_at: Timestamp | None = Field(description="(1.1) set on a tombstone")
    reactions: dict[str, list[str]] = Field(
        description="(1.1) emoji -> user ids in the order they reacted; emoji in the order they first "
        "appeared; {} when none",
    )
    rev: int = Field(description="(1.1) the conversation's rev at this message's last change")


# --- events -------------------------------------------------------------------


class Event(WireModel):
    """The envelope every event has; `data` is narrowed by each subclass."""

    type: str
    request_id: str | None = Field(
        default=None,
        description="the answered command's request_id on the sender's copy; null on every other copy",
    )
    ts: Timestamp
    event_id: str = Field(
        description="unique per event (an answer and its broadcast copies share it); an event published "
        "again after a crash carries the same id, so clients drop ids they have seen",
    )
    data: Any


NEXT = "null on the last page; otherwise pass it as `after` to get the next page"


class ConnectedData(WireModel):
    user: UserOut
    session_id: str
    conversations: list[ConversationOut]
    active_users: list[UserOut]
    conversations_next: str | None = Field(
        default=None,
        description="null when `conversations` is complete; otherwise the `after` "
        "of a get-conversations for the rest",
    )
    active_users_next: str | None = Field(
        default=None,
        description="null when `active_users` is complete; otherwise the `after` "
        "of a get-active-users for the rest",
    )


class Connected(Event):
    type: Literal["connected"] = "connected"
    data: ConnectedData


class UserConnectedData(WireModel):
    user: UserOut


class UserConnected(Event):
    type: Literal["user-connected"] = "user-connected"
    data: UserConnectedData


class UserDisconnectedData(WireModel):
    user_id: str


class UserDisconnected(Event):
    type: Literal["user-disconnected"] = "user-disconnected"
    data: UserDisconnectedData


class ConversationData(WireModel):
    conversation: ConversationOut


class ConversationCreated(Event):
    type: Literal["conversation-created"] = "conversation-created"
    data: ConversationData


class ParticipantsAddedData(WireModel):
    conversation_id: str
    user_ids: list[str]


class ParticipantsAdded(Event):
    type: Literal["participants-added"] = "participants-added"
    data: ParticipantsAddedData


class ParticipantLeftData(WireModel):
    conversation_id: str
    user_id: str


class ParticipantLeft(Event):
    type: Literal["participant-left"] = "participant-left"
    data: ParticipantLeftData


class ConversationIdData(WireModel):
    conversation_id: str


class ConversationRemoved(Event):
    type: Literal["conversation-removed"] = "conversation-removed"
    data: ConversationIdData


class MessageData(WireModel):
    message: MessageOut


class MessageAdded(Event):
    type: Literal["message-added"] = "message-added"
    data: MessageData


class MessagesData(WireModel):
    conversation_id: str
    messages: list[MessageOut]
    has_more: bool


class Messages(Event):
    type: Literal["messages"] = "messages"
    data: MessagesData


class ConversationsData(WireModel):
    conversations: list[ConversationOut]
    has_more: bool = False
    next: str | None = Field(default=None, description=NEXT)


class Conversations(Event):
    type: Literal["conversations"] = "conversations"
    data: ConversationsData


class ParticipantsData(WireModel):
    conversation_id: str
    participants: list[UserOut]
    has_more: bool = False
    next: str | None = Field(default=None, description=NEXT)


class Participants(Event):
    type: Literal["participants"] = "participants"
    data: ParticipantsData


class ActiveUsersData(WireModel):
    users: list[UserOut]
    has_more: bool = False
    next: str | None = Field(default=None, description=NEXT)


class ActiveUsers(Event):
    type: Literal["active-users"] = "active-users"
    data: ActiveUsersData


class ReadMarkerData(WireModel):
    conversation_id: str
    user_id: str
    read_seq: int


class ReadMarker(Event):
    type: Literal["read-marker"] = "read-marker"
    data: ReadMarkerData


class TypingData(WireModel):
    conversation_id: str
    user_id: str
    typing: bool


class TypingEvent(Event):
    """Published at QoS 0 and never stored; shown until `typing: false` or 10 s without `typing: true`."""

    type: Literal["typing"] = "typing"
    data: TypingData


class MessageEdited(Event):
    type: Literal["message-edited"] = "message-edited"
    data: MessageData


class MessageDeleted(Event):
    type: Literal["message-deleted"] = "message-deleted"
    data: MessageData


class ReactionChangedData(WireModel):
    conversation_id: str
    message_id: str
    emoji: str
    user_id: str
    on: bool
    message: MessageOut


class ReactionChanged(Event):
    type: Literal["reaction-changed"] = "reaction-changed"
    data: ReactionChangedData


class SearchResultsData(WireModel):
    query: str
    messages: list[MessageOut]
    has_more: bool


class SearchResults(Event):
    type: Literal["search-results"] = "search-results"
    data: SearchResultsData


class ErrorData(WireModel):
    code: ErrorCode
    message: str
    command: str | None
    retry_after: float | None = Field(default=None, description="seconds; only with rate-limited")


class Error(Event):
    type: Literal["error"] = "error"
    data: ErrorData


EVENTS: tuple[type[Event], ...] = (
    Connected,
    UserConnected,
    UserDisconnected,
    ConversationCreated,
    ParticipantsAdded,
    ParticipantLeft,
    ConversationRemoved,
    MessageAdded,
    Messages,
    Conversations,
    Participants,
    ActiveUsers,
    ReadMarker,
    TypingEvent,
    MessageEdited,
    MessageDeleted,
    ReactionChanged,
    SearchResults,
    Error,
)

# (1.1) Also on the conversation topic; `read-marker` and `typing` are not.
CONVERSATION_EVENTS: tuple[str, ...] = (
    "conversation-created",
    "participants-added",
    "participant-left",
    "conversation-removed",
    "message-added",
    "message-edited",
    "message-deleted",
    "reaction-changed",
)


# --- offline notifications (1.1) ---------------------------------------------------


class NotificationData(WireModel):
    user_id: str = Field(description="the participant without an active session")
    conversation_id: str = Field(description="for a reply, the thread's")
    message_id: str
    sender_id: str
    preview: str = Field(description="the body's first 100 characters (code points), nothing added")


class Notification(WireModel):
    """On `{prefix}/notifications/{user}` (QoS 1, not retained), for a push gateway."""

    type: Literal["notification"] = "notification"
    event_id: str
    ts: Timestamp
    data: NotificationData


# --- retained state topics ------------------------------------------------------


class Presence(WireModel):
    """Retained on `{prefix}/presence/{user}`."""

    user_id: str
    status: Literal["online", "offline"]
    since: Timestamp


class BridgeStatus(WireModel):
    """Retained on `{prefix}/bridge/status`; the bridge's last will is `{"status": "offline"}`."""

    status: Literal["online", "offline"]
    epoch: str | None = None
    since: Timestamp | None = None
