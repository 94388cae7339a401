"""(1.1) Edits, deletions and reactions: changes to stored messages, each taking the conversation's
next `rev`."""

from __future__ import annotations

import unicodedata
from dataclasses import replace

from . import protocol as p
from .core import Context, Handler, audience, is_member, message_out, owner_of_membership
from .errors import BadRequest, Forbidden, NotFound
from .model import Conversation, Message
from .model import react as with_reaction

MAX_EMOJI_PER_MESSAGE = 64


def changeable(ctx: Context, message_id: str) -> tuple[Message, Conversation]:
    """The message and its conversation if the sender takes part and it is not deleted; else not-found."""
    store = ctx.store
    message = store.get_message(message_id)
    conv = store.get_conversation(message.conversation_id) if message else None
    if message is None or message.deleted or conv is None or not is_member(store, conv, ctx.sender):
        raise NotFound(f"message {message_id} not found")
    return message, conv


def store_change(ctx: Context, old: Message, new: Message) -> Message:
    """Stamps the change with the conversation's next rev and stores it."""
    changed = replace(new, rev=ctx.store.next_rev(old.conversation_id))
    ctx.store.update_message(changed, expected_rev=old.rev)  # Conflict: a concurrent change won
    return changed


def tell(ctx: Context, event: type[p.Event], data: p.WireModel, conv: Conversation) -> None:
    ctx.answer(event, data)
    ctx.notify(event, data, [u for u in audience(ctx.store, conv) if u != ctx.sender], conv.conversation_id)


def edit_message(cmd: p.EditMessage, ctx: Context) -> None:
    message, conv = changeable(ctx, cmd.message_id)
    if message.sender_id != ctx.sender:
        raise Forbidden("only the sender may edit a message")
    if cmd.body == message.body:  # nothing changes: no rev, nobody told
        ctx.answer(p.MessageEdited, p.MessageData(message=message_out(message)))
        return
    edited = store_change(ctx, message, replace(message, body=cmd.body, edited_ms=ctx.now_ms))
    tell(ctx, p.MessageEdited, p.MessageData(message=message_out(edited)), conv)


def may_delete(ctx: Context, message: Message, conv: Conversation) -> bool:
    if message.sender_id == ctx.sender:
        return True
    group = conv if conv.kind != "thread" else ctx.store.get_conversation(owner_of_membership(conv))
    return group is not None and group.kind == "group" and group.owner_id == ctx.sender


def delete_message(cmd: p.DeleteMessage, ctx: Context) -> None:
    message, conv = changeable(ctx, cmd.message_id)
    if not may_delete(ctx, message, conv):
        raise Forbidden("only the sender or the group's owner may delete a message")
    tombstone = store_change(ctx, message, replace(message, body="", deleted_ms=ctx.now_ms, reactions=()))
    tell(ctx, p.MessageDeleted, p.MessageData(message=message_out(tombstone)), conv)


def check_emoji(emoji: str) -> None:
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in emoji):
        raise BadRequest("emoji: no whitespace or control characters")


def react(cmd: p.React, ctx: Context) -> None:
    check_emoji(cmd.emoji)
    message, conv = changeable(ctx, cmd.message_id)
    reactions = with_reaction(message.reactions, cmd.emoji, ctx.sender, cmd.on)
    if reactions is not None and len(reactions) > MAX_EMOJI_PER_MESSAGE:
        raise Forbidden(f"a message takes at most {MAX_EMOJI_PER_MESSAGE} different emoji")
    if reactions is not None:
        message = store_change(ctx, message, replace(message, reactions=reactions))
    data = p.ReactionChangedData(
        conversation_id=conv.conversation_id,
        message_id=message.message_id,
        emoji=cmd.emoji,
        user_id=ctx.sender,
        on=cmd.on,
        message=message_out(message),
    )
    if reactions is None:  # already so: answered, nobody else told
        ctx.answer(p.ReactionChanged, data)
    else:
        tell(ctx, p.ReactionChanged, data, conv)


HANDLERS: dict[type[p.Command], Handler] = {
    p.EditMessage: edit_message,
    p.DeleteMessage: delete_message,
    p.React: react,
}
