"""Each command of the protocol once: its fields and how to read its answer, for both faces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .types import Conversation, Message, Page, ReactionChange, ReadMarker, SearchResults, Session

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    command: str
    fields: dict[str, Any]
    read: Callable[[dict[str, Any]], T]


def _fields(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _key(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda data: data[name]


def _data(data: dict[str, Any]) -> Any:
    return data


def connect(session_id: str, display_name: str | None) -> Call[Session]:
    return Call("connect", _fields(session_id=session_id, display_name=display_name), _data)


def create_conversation(kind: str, participants: list[str], title: str | None) -> Call[Conversation]:
    return Call(
        "create-conversation",
        _fields(kind=kind, participants=list(participants), title=title),
        _key("conversation"),
    )


def invite(conversation_id: str, user_ids: list[str]) -> Call[list[str]]:
    return Call("invite", {"conversation_id": conversation_id, "user_ids": list(user_ids)}, _key("user_ids"))


def leave(conversation_id: str) -> Call[dict[str, Any]]:
    return Call("leave", {"conversation_id": conversation_id}, _data)


def remove_conversation(conversation_id: str) -> Call[str]:
    return Call("remove-conversation", {"conversation_id": conversation_id}, _key("conversation_id"))


def send_message(conversation_id: str, body: str, client_msg_id: str | None) -> Call[Message]:
    return Call(
        "send-message",
        _fields(conversation_id=conversation_id, body=body, client_msg_id=client_msg_id),
        _key("message"),
    )


def reply(message_id: str, body: str, client_msg_id: str | None) -> Call[Message]:
    return Call(
        "reply", _fields(message_id=message_id, body=body, client_msg_id=client_msg_id), _key("message")
    )


def get_messages(
    conversation_id: str, since_seq: int | None, since: str | None, since_rev: int | None, limit: int | None
) -> Call[Page]:
    if since_seq is None and since is None and since_rev is None:
        since_seq = 0
    return Call(
        "get-messages",
        _fields(
            conversation_id=conversation_id,
            since_seq=since_seq,
            since=since,
            since_rev=since_rev,
            limit=limit,
        ),
        _data,
    )


def get_prior_messages(conversation_id: str, before_seq: int | None, limit: int | None) -> Call[Page]:
    return Call(
        "get-prior-messages",
        _fields(conversation_id=conversation_id, before_seq=before_seq, limit=limit),
        _data,
    )


def get_conversations(after: str | None = None) -> Call[dict[str, Any]]:
    """One page; the faces follow `next` to the end (lists are paged by newer bridges)."""
    return Call("get-conversations", _fields(after=after), _data)


def get_participants(conversation_id: str, after: str | None = None) -> Call[dict[str, Any]]:
    return Call("get-participants", _fields(conversation_id=conversation_id, after=after), _data)


def get_active_users(after: str | None = None) -> Call[dict[str, Any]]:
    return Call("get-active-users", _fields(after=after), _data)


# the list a paged answer carries
LIST_KEYS = {
    "get-conversations": "conversations",
    "get-participants": "participants",
    "get-active-users": "users",
}


def page_items(call: Call[dict[str, Any]], data: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The items of one page and the `after` of the next (None on the last page)."""
    after = data.get("next")
    return list(data[LIST_KEYS[call.command]]), after if isinstance(after, str) and after else None


def mark_read(conversation_id: str, seq: int) -> Call[ReadMarker]:
    return Call("mark-read", {"conversation_id": conversation_id, "seq": seq}, _data)


def edit_message(message_id: str, body: str) -> Call[Message]:
    return Call("edit-message", {"message_id": message_id, "body": body}, _key("message"))


def delete_message(message_id: str) -> Call[Message]:
    return Call("delete-message", {"message_id": message_id}, _key("message"))


def react(message_id: str, emoji: str, on: bool) -> Call[ReactionChange]:
    return Call("react", {"message_id": message_id, "emoji": emoji, "on": on}, _data)


def search_messages(query: str, conversation_id: str | None, limit: int | None) -> Call[SearchResults]:
    return Call("search-messages", _fields(query=query, conversation_id=conversation_id, limit=limit), _data)
