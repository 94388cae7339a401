"""The pure core: each handler turns one command into changes in a Store and
the events to deliver. No MQTT, SQL, threads or clocks here: the time, the id
generator and the current epoch come in through `Context`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from pydantic_core import PydanticUndefined

from . import protocol as p
from .errors import BadRequest, Forbidden, NotFound
from .limits import (
    DEFAULT_MAX_EVENT,
    ENVELOPE_RESERVE,
    MAX_CONVERSATIONS_PER_USER,
    MAX_GROUP_PARTICIPANTS,
    MAX_PAGE,
)
from .model import GLOBAL_ID, ChatSession, Conflict, Conversation, Message, Store, User, direct_key, paged

PREVIEW_CHARS = 100  # of a notification: the body's first 100 code points


@dataclass(frozen=True, slots=True)
class Delivery:
    """One payload for one destination.

    `inbox` goes to `{prefix}/users/{key}/inbox`, `conversation` to
    `{prefix}/conversations/{key}/events`, `presence` (retained) to
    `{prefix}/presence/{key}`, `notification` to `{prefix}/notifications/{key}`.

    `qos` 0 marks an ephemeral delivery (typing): published at QoS 0, never stored in the outbox,
    never published again.
    """

    kind: Literal["inbox", "conversation", "presence", "notification"]
    key: str
    payload: p.WireModel
    qos: Literal[0, 1] = 1


M = TypeVar("M", bound=p.WireModel)
_UNSET: Any = object()
_SHARED = (str, int, float, bool, type(None), type(PydanticUndefined))
# Per model class: its fields in order with their defaults (_UNSET for a required one), the required
# names; None for a class `trusted` leaves to pydantic (aliases, default factories, extras, hooks).
_PLANS: dict[type, tuple[dict[str, Any], frozenset[str]] | None] = {}


def _plan(cls: type[p.WireModel]) -> tuple[dict[str, Any], frozenset[str]] | None:
    fields = cls.__pydantic_fields__
    plain = (
        cls.model_config.get("extra") != "allow"
        and not cls.__pydantic_post_init__
        and not cls.__pydantic_root_model__
        and all(
            f.alias is None
            and f.validation_alias is None
            and f.default_factory is None
            and isinstance(f.default, _SHARED)  # pydantic copies any other default for each instance
            for f in fields.values()
        )
    )
    if not plain:
        return None
    template = {name: _UNSET if f.is_required() else f.default for name, f in fields.items()}
    return template, frozenset(name for name, f in fields.items() if f.is_required())


def trusted(cls: type[M], **values: Any) -> M:
    """`cls.model_construct(**values)`, the same instance, without its walk over every field's
    aliases and defaults (13 µs an event, two events a chat message): the defaults are looked up
    once per class. The values are the bridge's own, already valid; nothing is checked."""
    plan = _PLANS.get(cls, _UNSET)
    if plan is _UNSET:
        plan = _PLANS[cls] = _plan(cls)
    if plan is None:
        return cls.model_construct(**values)
    template, required = plan
    fields = template.copy()
    fields.update(values)  # keeps the fields' order
    if len(fields) != len(template) or not required <= values.keys():
        return cls.model_construct(**values)  # an unknown or a missing name: as pydantic does it
    m = cls.__new__(cls)
    object.__setattr__(m, "__dict__", fields)
    object.__setattr__(m, "__pydantic_fields_set__", set(values))
    object.__setattr__(m, "__pydantic_extra__", None)
    object.__setattr__(m, "__pydantic_private__", None)
    return m


@dataclass
class Context:
    store: Store
    sender: str
    now_ms: int
    new_id: Callable[[str], str]
    epoch: str = ""
    request_id: str | None = None
    # False: presence lives only in the retained presence topics (no user-connected/-disconnected to
    # every active inbox, no active_users in `connected`), which makes a connect storm O(N), not O(N²).
    broadcast_presence: bool = True
    max_event: int = DEFAULT_MAX_EVENT  # bytes: lists are cut into pages that fit
    out: list[Delivery] = field(default_factory=list)
    last_answer: p.Event | None = None  # broadcast copies of the same event share its event_id

    @property
    def ts(self) -> str:
        return p.iso_ms(self.now_ms)

    @property
    def budget(self) -> int:
        """Bytes the items of one event's list may take."""
        return self.max_event - ENVELOPE_RESERVE

    # Events are assembled from already-validated parts, so they skip validation (`trusted`).
    def answer(self, event_type: type[p.Event], data: Any) -> None:
        event = trusted(
            event_type, ts=self.ts, request_id=self.request_id, event_id=self.new_id("v"), data=data
        )
        self.out.append(Delivery("inbox", self.sender, event))
        self.last_answer = event

    def notify(
        self, event_type: type[p.Event], data: Any, users: Iterable[str], conversation_id: str | None = None
    ) -> None:
        """One broadcast copy (request_id null) to each user, and to the conversation's topic."""
        answered = self.last_answer
        same = answered is not None and type(answered) is event_type and answered.data is data
        event_id = answered.event_id if answered is not None and same else self.new_id("v")
        event = trusted(event_type, ts=self.ts, request_id=None, event_id=event_id, data=data)
        self.out.extend(Delivery("inbox", u, event) for u in users)
        if conversation_id is not None:
            self.out.append(Delivery("conversation", conversation_id, event))


Handler = Callable[[Any, Context], None]
T = TypeVar("T")
V = TypeVar("V", bound=p.WireModel)


# --- pages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page(Generic[T, V]):
    views: list[V]
    last: T | None  # the last item taken
    cut: bool  # items were left over
    size: int  # bytes the views take in the event's JSON


def page_of(items: Iterable[T], view: Callable[[T], V], budget: int, limit: int) -> Page[T, V]:
    """The views of the first items that fit in `budget` bytes of JSON and `limit` items; at least one
    (an item too large on its own makes the event too large, which the service refuses)."""
    views: list[V] = []
    last, used = None, 0
    for item in items:
        if len(views) == limit:
            return Page(views, last, True, used)
        v = view(item)
        size = len(v.__pydantic_serializer__.to_json(v)) + 1
        if used + size > budget and views:
            return Page(views, last, True, used)
        views.append(v)
        last, used = item, used + size
    return Page(views, last, False, used)


# --- views --------------------------------------------------------------------


def user_out(user: User, active: set[str]) -> p.UserOut:
    return p.UserOut(user_id=user.user_id, display_name=user.display_name, active=user.user_id in active)


def message_out(m: Message) -> p.MessageOut:
    """The message as sent: made from the stored message's fields, valid as they were stored (validating
    them again cost about as much as the rest of the chat message's events)."""
    return trusted(
        p.MessageOut,
        message_id=m.message_id,
        conversation_id=m.conversation_id,
        seq=m.seq,
        sender_id=m.sender_id,
        body=m.body,
        client_msg_id=m.client_msg_id,
        created_at=p.iso_ms(m.created_ms),
        edited_at=None if m.edited_ms is None else p.iso_ms(m.edited_ms),
        deleted_at=None if m.deleted_ms is None else p.iso_ms(m.deleted_ms),
        reactions={emoji: list(users) for emoji, users in m.reactions},
        rev=m.rev,
    )


def owner_of_membership(conv: Conversation) -> str:
    """The conversation whose participants these are: a thread's are its parent's."""
    if conv.kind == "thread":
        assert conv.parent_conversation_id is not None
        return conv.parent_conversation_id
    return conv.conversation_id


def members(store: Store, conv: Conversation) -> list[str]:
    """Who takes part: everyone for global (and its threads), the parent's participants for a thread."""
    source = owner_of_membership(conv)
    return store.all_user_ids() if source == GLOBAL_ID else store.participant_ids(source)


def audience(store: Store, conv: Conversation) -> list[str]:
    """Who hears of what happens in it: the participants, but for global (and its threads) only users
    with a live session, so that its cost never grows with users who are away (they catch up with
    get-messages)."""
    if owner_of_membership(conv) == GLOBAL_ID:
        return store.active_user_ids()
    return members(store, conv)


def conversation_out(store: Store, conv: Conversation, read_seq: int = 0) -> p.ConversationOut:
    """The conversation as sent to the user whose marker is `read_seq` (0: not addressed to one user)."""
    read_seq = min(read_seq, conv.last_seq)
    return p.ConversationOut(
        conversation_id=conv.conversation_id,
        kind=conv.kind,
        title=conv.title,
        owner_id=conv.owner_id,
        participants=[] if owner_of_membership(conv) == GLOBAL_ID else members(store, conv),
        parent_conversation_id=conv.parent_conversation_id,
        parent_message_id=conv.parent_message_id,
        created_at=p.iso_ms(conv.created_ms),
        last_seq=conv.last_seq,
        read_seq=read_seq,
        unread=conv.last_seq - read_seq,
        last_rev=conv.last_rev,
    )


def visible_conversation(ctx: Context, conversation_id: str) -> Conversation:
    """The conversation if the sender takes part in it; `not-found` otherwise, so existence never leaks."""
    conv = ctx.store.get_conversation(conversation_id)
    if conv is None or not is_member(ctx.store, conv, ctx.sender):
        raise NotFound(f"conversation {conversation_id} not found")
    return conv


def is_member(store: Store, conv: Conversation, user_id: str) -> bool:
    source = owner_of_membership(conv)
    return source == GLOBAL_ID or store.is_participant(source, user_id)


def ensure_user(ctx: Context, display_name: str | None = None) -> User:
    """The sender, registered by its first command of any kind (identity comes from the topic,
    which the broker guards)."""
    user = ctx.store.get_user(ctx.sender)
    if user is None:
        twins = [u for u in ctx.store.user_ids_ignoring_case(ctx.sender) if u != ctx.sender]
        if twins:  # `ALICE` beside `alice` would pass for her everywhere a name is shown
            raise Forbidden(
                f"user id {ctx.sender} differs from the existing user {twins[0]} only in case; "
                "it cannot be registered"
            )
        user = User(ctx.sender, display_name, ctx.now_ms)
        ctx.store.save_user(user)
    elif display_name is not None and display_name != user.display_name:
        user = replace(user, display_name=display_name)
        ctx.store.save_user(user)
    return user


def known_users(store: Store, user_ids: Sequence[str]) -> list[str]:
    """The ids, deduplicated in order; `not-found` naming the first unknown one."""
    unique = list(dict.fromkeys(user_ids))
    found = {u.user_id for u in store.get_users(unique)}
    missing = [u for u in unique if u not in found]
    if missing:
        raise NotFound(f"unknown user {missing[0]}")
    return unique


def check_room(store: Store, user_ids: Sequence[str]) -> None:
    """`forbidden` when others would add a user to more conversations than the cap allows."""
    if not user_ids:
        return
    counts = store.membership_counts(user_ids)
    full = [u for u in user_ids if counts.get(u, 0) >= MAX_CONVERSATIONS_PER_USER]
    if full:
        raise Forbidden(
            f"{full[0]} already takes part in {MAX_CONVERSATIONS_PER_USER} conversations, "
            "the most others may add them to"
        )


# --- sessions and presence ------------------------------------------------------


def presence(ctx: Context, user_id: str, status: Literal["online", "offline"]) -> None:
    ctx.out.append(Delivery("presence", user_id, p.Presence(user_id=user_id, status=status, since=ctx.ts)))


def connect(cmd: p.Connect, ctx: Context) -> None:
    store = ctx.store
    user = ensure_user(ctx, cmd.display_name)
    was_active = store.has_active_session(user.user_id)
    session = store.get_session(user.user_id, cmd.session_id)
    if session is None or not session.active:
        store.save_session(ChatSession(user.user_id, cmd.session_id, ctx.epoch, ctx.now_ms))
    elif session.epoch != ctx.epoch:
        store.save_session(replace(session, epoch=ctx.epoch))  # re-announced after a bridge restart
    active_ids = store.active_user_ids() if ctx.broadcast_presence else [user.user_id]
    active = set(active_ids)
    me = user_out(user, active)
    # Both lists share one event: conversations may take half of it, active users the rest.
    convs = conversation_page(ctx, None, MAX_PAGE, ctx.budget // 2)
    users = (
        user_page(ctx, sorted(active_ids), active, None, MAX_PAGE, ctx.budget - convs.size)
        if ctx.broadcast_presence
        else Page([], None, False, 0)
    )
    ctx.answer(
        p.Connected,
        p.ConnectedData(
            user=me,
            session_id=cmd.session_id,
            conversations=convs.views,
            active_users=users.views,
            conversations_next=conversation_cursor(convs),
            active_users_next=user_cursor(users),
        ),
    )
    if not was_active:
        if ctx.broadcast_presence:
            ctx.notify(p.UserConnected, p.UserConnectedData(user=me), active_ids)
        presence(ctx, user.user_id, "online")


def end_session(ctx: Context, session: ChatSession) -> None:
    store = ctx.store
    store.save_session(replace(session, ended_ms=ctx.now_ms))
    if not store.has_active_session(session.user_id):
        if ctx.broadcast_presence:
            ctx.notify(
                p.UserDisconnected, p.UserDisconnectedData(user_id=session.user_id), store.active_user_ids()
            )
        presence(ctx, session.user_id, "offline")


def disconnect(cmd: p.Disconnect, ctx: Context) -> None:
    session = ctx.store.get_session(ctx.sender, cmd.session_id)
    if session is not None and session.active:  # otherwise a stale will: nothing to do
        end_session(ctx, session)


def expire_sessions(ctx: Context) -> int:
    """Ends the sessions not re-announced since this bridge's epoch began; returns how many."""
    stale = ctx.store.active_sessions_outside_epoch(ctx.epoch)
    for session in stale:
        end_session(ctx, session)
    return len(stale)


# --- conversations --------------------------------------------------------------


def create_conversation(cmd: p.CreateConversation, ctx: Context) -> None:
    store = ctx.store
    if cmd.kind == "direct":
        if len(set(cmd.participants)) != 1:
            raise BadRequest("a direct conversation takes exactly one other participant")
        (other,) = set(cmd.participants)
        if other == ctx.sender:
            raise BadRequest("a direct conversation with oneself is not allowed")
        known_users(store, [other])
        key = direct_key(ctx.sender, other)
        existing = store.find_direct(key)
        if existing is not None:
            mine = conversation_out(store, existing, store.read_seq(existing.conversation_id, ctx.sender))
            ctx.answer(p.ConversationCreated, p.ConversationData(conversation=mine))
            return
        check_room(store, [other])
        conv = Conversation(ctx.new_id("c"), "direct", cmd.title, None, None, None, ctx.now_ms)
        store.add_conversation(conv, [ctx.sender, other], direct_key=key)  # Conflict: a racing twin won
    else:
        others = [u for u in known_users(store, cmd.participants) if u != ctx.sender]
        check_room(store, others)
        conv = Conversation(ctx.new_id("c"), "group", cmd.title, ctx.sender, None, None, ctx.now_ms)
        store.add_conversation(conv, [ctx.sender, *others])
    data = p.ConversationData(conversation=conversation_out(store, conv))
    ctx.answer(p.ConversationCreated, data)
    ctx.notify(
        p.ConversationCreated,
        data,
        [u for u in store.participant_ids(conv.conversation_id) if u != ctx.sender],
        conv.conversation_id,
    )


def invite(cmd: p.Invite, ctx: Context) -> None:
    store = ctx.store
    conv = visible_conversation(ctx, cmd.conversation_id)
    if conv.kind != "group":
        raise Forbidden(f"cannot invite to a {conv.kind} conversation")
    invited = known_users(store, cmd.user_ids)
    existing = store.participant_ids(conv.conversation_id)
    new = [u for u in invited if u not in set(existing)]
    if len(existing) + len(new) > MAX_GROUP_PARTICIPANTS:
        raise Forbidden(f"a group has at most {MAX_GROUP_PARTICIPANTS} participants")
    check_room(store, new)
    data = p.ParticipantsAddedData(conversation_id=conv.conversation_id, user_ids=new)
    ctx.answer(p.ParticipantsAdded, data)
    if not new:
        return
    store.add_participants(conv.conversation_id, new)
    ctx.notify(p.ParticipantsAdded, data, [u for u in existing if u != ctx.sender], conv.conversation_id)
    created = p.ConversationData(conversation=conversation_out(store, conv))
    ctx.notify(p.ConversationCreated, created, new)


def remove(ctx: Context, conv: Conversation) -> None:
    """Deletes the conversation with its threads; tells every participant."""
    store = ctx.store
    everyone = members(store, conv)
    for thread in store.threads_of(conv.conversation_id):
        store.delete_conversation(thread.conversation_id)
        ctx.notify(
            p.ConversationRemoved,
            p.ConversationIdData(conversation_id=thread.conversation_id),
            [],
            thread.conversation_id,
        )
    store.delete_conversation(conv.conversation_id)
    data = p.ConversationIdData(conversation_id=conv.conversation_id)
    ctx.answer(p.ConversationRemoved, data)
    ctx.notify(p.ConversationRemoved, data, [u for u in everyone if u != ctx.sender], conv.conversation_id)


def leave(cmd: p.Leave, ctx: Context) -> None:
    conv = visible_conversation(ctx, cmd.conversation_id)
    if conv.kind != "group":
        raise Forbidden(f"cannot leave a {conv.kind} conversation")
    if conv.owner_id == ctx.sender:
        remove(ctx, conv)
        return
    ctx.store.remove_participant(conv.conversation_id, ctx.sender)
    threads = [t.conversation_id for t in ctx.store.threads_of(conv.conversation_id)]
    ctx.store.forget_read_markers([conv.conversation_id, *threads], ctx.sender)  # a re-invite starts at 0
    data = p.ParticipantLeftData(conversation_id=conv.conversation_id, user_id=ctx.sender)
    ctx.answer(p.ParticipantLeft, data)
    ctx.notify(p.ParticipantLeft, data, ctx.store.participant_ids(conv.conversation_id), conv.conversation_id)


def remove_conversation(cmd: p.RemoveConversation, ctx: Context) -> None:
    conv = visible_conversation(ctx, cmd.conversation_id)
    if conv.owner_id != ctx.sender:
        raise Forbidden("only the owner may remove a conversation")
    remove(ctx, conv)


# --- messages ---------------------------------------------------------------------


def post(
    ctx: Context,
    conv: Conversation,
    body: str,
    client_msg_id: str | None,
    everyone: list[str] | None = None,
    offline: set[str] | None = None,
) -> None:
    """Stores a message and tells the participants (`everyone`, when the caller already read them, and
    `offline`, those of them without an active session, when it read that too)."""
    store = ctx.store
    if client_msg_id is not None:
        original = store.find_by_client_msg_id(conv.conversation_id, ctx.sender, client_msg_id)
        if original is not None:
            ctx.answer(p.MessageAdded, p.MessageData(message=message_out(original)))
            return
    seq, rev = store.next_position(conv.conversation_id)
    message = Message(
        ctx.new_id("m"), conv.conversation_id, seq, ctx.sender, body, client_msg_id, ctx.now_ms, rev
    )
    store.add_message(message)
    store.set_read_seq(conv.conversation_id, ctx.sender, seq)  # one's own message is read
    data = trusted(p.MessageData, message=message_out(message))
    ctx.answer(p.MessageAdded, data)
    others = [u for u in (everyone if everyone is not None else audience(store, conv)) if u != ctx.sender]
    ctx.notify(p.MessageAdded, data, others, conv.conversation_id)
    if owner_of_membership(conv) != GLOBAL_ID:
        notify_offline(ctx, message, others, offline)


def notify_offline(
    ctx: Context, message: Message, recipients: Sequence[str], known: set[str] | None = None
) -> None:
    """A notification for each recipient without an active session (for a push gateway); `known`:
    those of them without one, when the caller read it already."""
    offline = (
        ctx.store.without_active_session(recipients)
        if known is None
        else [u for u in recipients if u in known]
    )
    if not offline:
        return
    data_of = {
        u: p.NotificationData(
            user_id=u,
            conversation_id=message.conversation_id,
            message_id=message.message_id,
            sender_id=message.sender_id,
            preview=message.body[:PREVIEW_CHARS],
        )
        for u in offline
    }
    event_id = ctx.last_answer.event_id if ctx.last_answer is not None else ctx.new_id("v")
    for u, data in data_of.items():
        note = trusted(p.Notification, event_id=f"{event_id}.{u}", ts=ctx.ts, data=data)
        ctx.out.append(Delivery("notification", u, note))


def send_message(cmd: p.SendMessage, ctx: Context) -> None:
    # One read of the participants (and who of them is online) serves the visibility check, the
    # delivery and the notifications (the hot path).
    conv = ctx.store.get_conversation(cmd.conversation_id)
    offline: set[str] | None = None
    if conv is None:
        everyone = []
    elif owner_of_membership(conv) == conv.conversation_id != GLOBAL_ID:  # a direct or group one
        online = ctx.store.participants_online(conv.conversation_id)
        everyone = [u for u, _ in online]
        offline = {u for u, on in online if not on}
    else:
        everyone = audience(ctx.store, conv)
    if conv is None or (owner_of_membership(conv) != GLOBAL_ID and ctx.sender not in everyone):
        raise NotFound(f"conversation {cmd.conversation_id} not found")
    post(ctx, conv, cmd.body, cmd.client_msg_id, everyone, offline)


def reply(cmd: p.Reply, ctx: Context) -> None:
    store = ctx.store
    root = store.get_message(cmd.message_id)
    conv = store.get_conversation(root.conversation_id) if root else None
    if root is None or root.deleted or conv is None or not is_member(store, conv, ctx.sender):
        raise NotFound(f"message {cmd.message_id} not found")
    if conv.kind == "thread":
        thread = conv  # threads do not nest: a reply to a reply joins the same thread
    else:
        found = store.find_thread(root.message_id)
        if found is None:
            thread = Conversation(
                ctx.new_id("t"), "thread", None, None, conv.conversation_id, root.message_id, ctx.now_ms
            )
            store.add_conversation(thread, [])  # Conflict when a concurrent reply created it first
            created = p.ConversationData(conversation=conversation_out(store, thread))
            ctx.notify(p.ConversationCreated, created, audience(store, thread), thread.conversation_id)
        else:
            thread = found
    post(ctx, thread, cmd.body, cmd.client_msg_id)


def get_messages(cmd: p.GetMessages, ctx: Context) -> None:
    conv = visible_conversation(ctx, cmd.conversation_id)
    if [cmd.since_seq, cmd.since, cmd.since_rev].count(None) != 2:
        raise BadRequest("give exactly one of since_seq, since and since_rev")
    if cmd.since_rev is not None:
        rows = ctx.store.messages_after_rev(conv.conversation_id, cmd.since_rev, cmd.limit + 1)
    elif cmd.since_seq is not None:
        rows = ctx.store.messages_after_seq(conv.conversation_id, cmd.since_seq, cmd.limit + 1)
    else:
        assert cmd.since is not None
        rows = ctx.store.messages_after_ms(conv.conversation_id, p.ms_of(cmd.since), cmd.limit + 1)
    page, has_more = paged(rows, cmd.limit)
    fits = page_of(page, message_out, ctx.budget, cmd.limit)  # fewer messages when they are large
    ctx.answer(
        p.Messages,
        p.MessagesData(
            conversation_id=conv.conversation_id, messages=fits.views, has_more=has_more or fits.cut
        ),
    )


def get_prior_messages(cmd: p.GetPriorMessages, ctx: Context) -> None:
    conv = visible_conversation(ctx, cmd.conversation_id)
    rows = ctx.store.messages_before_seq(conv.conversation_id, cmd.before_seq, cmd.limit + 1)
    page, has_more = paged(rows, cmd.limit)
    fits = page_of(page, message_out, ctx.budget, cmd.limit)  # the newest that fit, then ascending
    ctx.answer(
        p.Messages,
        p.MessagesData(
            conversation_id=conv.conversation_id,
            messages=fits.views[::-1],
            has_more=has_more or fits.cut,
        ),
    )


# Conversation lists are ordered global first, then by (created_ms, conversation_id); a cursor is the
# key of the last conversation of a page, so removing or adding conversations between pages never
# skips or repeats one.
_CURSOR = re.compile(r"(-1|[0-9]{1,19})\.([A-Za-z0-9_-]{0,64})")


def conversation_key(conv: Conversation) -> tuple[int, str]:
    return (-1, "") if conv.conversation_id == GLOBAL_ID else (conv.created_ms, conv.conversation_id)


def conversation_cursor(page: Page[Conversation, p.ConversationOut]) -> str | None:
    if not page.cut or page.last is None:
        return None
    ms, cid = conversation_key(page.last)
    return f"{ms}.{cid}"


def user_cursor(page: Page[User, p.UserOut]) -> str | None:
    return page.last.user_id if page.cut and page.last is not None else None


def conversation_page(
    ctx: Context, after: str | None, limit: int, budget: int
) -> Page[Conversation, p.ConversationOut]:
    store = ctx.store
    convs = [c for c in [store.get_conversation(GLOBAL_ID), *store.conversations_of(ctx.sender)] if c]
    if after is not None:
        match = _CURSOR.fullmatch(after)
        if match is None:
            raise BadRequest("after: not a cursor from a conversations page")
        key = (int(match.group(1)), match.group(2))
        convs = [c for c in convs if conversation_key(c) > key]
    markers = store.read_markers(ctx.sender)
    return page_of(
        convs, lambda c: conversation_out(store, c, markers.get(c.conversation_id, 0)), budget, limit
    )


def user_page(
    ctx: Context, user_ids: Sequence[str], active: set[str], after: str | None, limit: int, budget: int
) -> Page[User, p.UserOut]:
    """Users by ascending id (Python's order: the same on every store), after the cursor."""
    ids = [u for u in user_ids if after is None or u > after]
    wanted = ids[: limit + 1]  # one more than a page: whether any are left
    users = sorted(ctx.store.get_users(wanted), key=lambda u: u.user_id)
    page = page_of(users[:limit], lambda u: user_out(u, active), budget, limit)
    if len(ids) > limit and not page.cut:
        page = replace(page, cut=True)
    return page


def get_conversations(cmd: p.GetConversations, ctx: Context) -> None:
    page = conversation_page(ctx, cmd.after, cmd.limit, ctx.budget)
    next_ = conversation_cursor(page)
    ctx.answer(
        p.Conversations,
        p.ConversationsData(conversations=page.views, has_more=next_ is not None, next=next_),
    )


def get_participants(cmd: p.GetParticipants, ctx: Context) -> None:
    conv = visible_conversation(ctx, cmd.conversation_id)
    active = set(ctx.store.active_user_ids())
    ids = sorted(members(ctx.store, conv))
    page = user_page(ctx, ids, active, cmd.after, cmd.limit, ctx.budget)
    next_ = user_cursor(page)
    ctx.answer(
        p.Participants,
        p.ParticipantsData(
            conversation_id=conv.conversation_id,
            participants=page.views,
            has_more=next_ is not None,
            next=next_,
        ),
    )


def get_active_users(cmd: p.GetActiveUsers, ctx: Context) -> None:
    ids = sorted(ctx.store.active_user_ids())
    page = user_page(ctx, ids, set(ids), cmd.after, cmd.limit, ctx.budget)
    next_ = user_cursor(page)
    ctx.answer(p.ActiveUsers, p.ActiveUsersData(users=page.views, has_more=next_ is not None, next=next_))


HANDLERS: dict[type[p.Command], Handler] = {
    p.Connect: connect,
    p.Disconnect: disconnect,
    p.CreateConversation: create_conversation,
    p.Invite: invite,
    p.Leave: leave,
    p.RemoveConversation: remove_conversation,
    p.SendMessage: send_message,
    p.Reply: reply,
    p.GetMessages: get_messages,
    p.GetPriorMessages: get_prior_messages,
    p.GetConversations: get_conversations,
    p.GetParticipants: get_participants,
    p.GetActiveUsers: get_active_users,
}

__all__ = ["HANDLERS", "Conflict", "Context", "Delivery", "expire_sessions"]
