"""(1.1) Read markers and typing: what users tell each other about reading and writing."""

from __future__ import annotations

from . import protocol as p
from .core import Context, Delivery, Handler, members, owner_of_membership, visible_conversation
from .errors import Forbidden
from .model import GLOBAL_ID


def mark_read(cmd: p.MarkRead, ctx: Context) -> None:
    """Moves the sender's marker forward (clamped to last_seq); the other participants are told,
    except in global and its threads (everyone takes part there)."""
    conv = visible_conversation(ctx, cmd.conversation_id)
    store = ctx.store
    current = store.read_seq(conv.conversation_id, ctx.sender)
    target = min(cmd.seq, conv.last_seq)
    moved = target > current
    if moved:
        store.set_read_seq(conv.conversation_id, ctx.sender, target)
    data = p.ReadMarkerData(
        conversation_id=conv.conversation_id, user_id=ctx.sender, read_seq=max(target, current)
    )
    ctx.answer(p.ReadMarker, data)
    if moved and owner_of_membership(conv) != GLOBAL_ID:
        ctx.notify(p.ReadMarker, data, [u for u in members(store, conv) if u != ctx.sender])


def typing(cmd: p.Typing, ctx: Context) -> None:
    """Relayed at QoS 0 to the other participants' inboxes; nothing stored, no answer on success."""
    conv = visible_conversation(ctx, cmd.conversation_id)
    if owner_of_membership(conv) == GLOBAL_ID:
        raise Forbidden("typing is not relayed in global or its threads")
    event = p.TypingEvent.model_construct(
        ts=ctx.ts,
        request_id=None,
        event_id=ctx.new_id("v"),
        data=p.TypingData(conversation_id=conv.conversation_id, user_id=ctx.sender, typing=cmd.typing),
    )
    ctx.out.extend(Delivery("inbox", u, event, qos=0) for u in members(ctx.store, conv) if u != ctx.sender)


HANDLERS: dict[type[p.Command], Handler] = {p.MarkRead: mark_read, p.Typing: typing}
