"""The service layer: raw commands in, deliveries out, one transaction per batch.

Each command runs in its own savepoint, so a bad or failing command changes
nothing while the others in its batch commit together.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from . import core, handlers, topics
from . import protocol as p
from .errors import BadRequest, ChatError, InternalError, PayloadTooLarge, RateLimited, UnknownCommand
from .limits import DEFAULT_MAX_EVENT, CostBudget, OncePer, RateLimiter
from .metrics import Metrics
from .model import Conflict, OutboxEntry, Store, UnitOfWork

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A command as it came off the wire: the user and command from the topic, the raw payload."""

    user_id: str
    command: str
    payload: bytes
    # Delivered from the broker's queue after the bridge was away (published while it was down or
    # behind): the broker's guards limited it at publish time, so it is never rate-limited here.
    queued: bool = False


def cost_of(deliveries: Sequence[core.Delivery]) -> int:
    """What a command cost (`CostBudget`): one per event, and one per message, conversation or user a
    page of history or a listing carries, read from the database for it (a page of 500 messages costs
    as much as a message to 500 people; charged as one, one user asking for such pages as fast as the
    rate limit allowed kept the database busy and everybody else's commands waited half a minute). A
    page with more to come costs what was read for it (`limit`), though fewer fit the answer; a page that
    reached the end costs what it carries (a catch-up of many quiet conversations stays cheap)."""
    total = len(deliveries)
    for delivery in deliveries:
        listed = _LISTED.get(type(getattr(delivery.payload, "data", None)))
        if listed is not None:
            total += len(getattr(delivery.payload.data, listed))  # type: ignore[attr-defined]
    return total


# The data of a page or a listing (no subclasses: looked up by type), and the list it carries.
_LISTED: dict[type, str] = {
    p.MessagesData: "messages",
    p.ConversationsData: "conversations",
    p.ParticipantsData: "participants",
    p.ActiveUsersData: "users",
}


# Ids are the prefix, `_` and 16 URL-safe base64 characters: 12 random bytes from the operating
# system's CSPRNG, as `secrets.token_urlsafe(12)` makes them. 12 bytes are 16 characters without
# padding, so a block of `_ID_BLOCK` ids is read and encoded at once and cut into ids (a read and an
# encoding per id were about a tenth of a chat message's CPU on the database thread). Each thread
# has its own block; a forked child starts without one, so it never repeats its parent's ids.
_ID_BYTES = 12
_ID_CHARS = 16
_ID_BLOCK = 256


class _IdBlock(threading.local):
    def __init__(self) -> None:
        self.chars = ""
        self.pos = 0


_ids = _IdBlock()


def _forget_ids() -> None:
    global _ids
    _ids = _IdBlock()


os.register_at_fork(after_in_child=_forget_ids)


def new_id(prefix: str) -> str:
    block = _ids
    pos = block.pos
    if pos >= len(block.chars):
        block.chars = base64.urlsafe_b64encode(os.urandom(_ID_BYTES * _ID_BLOCK)).decode("ascii")
        pos = 0
    block.pos = pos + _ID_CHARS
    return f"{prefix}_{block.chars[pos : pos + _ID_CHARS]}"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Batch:
    """What one transaction produced: the deliveries, the same serialized as outbox entries, and the
    ephemeral ones (QoS 0, never stored: typing) to publish once, without waiting for the broker."""

    id: str
    deliveries: list[core.Delivery]
    entries: list[OutboxEntry]
    ephemeral: list[OutboxEntry] = field(default_factory=list)


# Serialized events by id(): the event itself is kept beside its bytes, so that an id reused by a
# later object never matches.
Wire = dict[int, tuple[p.WireModel, bytes]]


def serialized(event: p.WireModel, wire: Wire) -> bytes:
    known = wire.get(id(event))
    if known is not None and known[0] is event:
        return known[1]
    data = event.__pydantic_serializer__.to_json(event)
    wire[id(event)] = (event, data)
    return data


def encode(deliveries: Sequence[core.Delivery], batch: str, wire: Wire | None = None) -> list[OutboxEntry]:
    """Serializes each event once, however many recipients share it (`wire`: already serialized);
    QoS 0 deliveries included."""
    encoded: Wire = {} if wire is None else wire
    return [
        OutboxEntry(d.kind, d.key, serialized(d.payload, encoded), topics.retained(d.kind), batch, d.qos)
        for d in deliveries
    ]


def batch_of(batch_id: str, deliveries: list[core.Delivery], wire: Wire | None = None) -> Batch:
    """The batch, its QoS 1 entries (for the outbox) apart from the ephemeral ones."""
    entries = encode(deliveries, batch_id, wire)
    return Batch(batch_id, deliveries, [e for e in entries if e.qos], [e for e in entries if not e.qos])


def parse(item: Inbound, max_payload: int) -> p.Command:
    """Validates the payload against the command's model; raises the protocol's errors."""
    if len(item.payload) > max_payload:
        raise PayloadTooLarge(f"payload is {len(item.payload)} bytes; the limit is {max_payload}")
    model = p.COMMANDS.get(item.command)
    if model is None:
        raise UnknownCommand(f"no command named {item.command!r}")
    try:
        return model.model_validate_json(item.payload)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return "payload is not valid JSON"
    if first["type"] in ("model_type", "model_attributes_type"):
        return "payload must be a JSON object"
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"


def request_id_of(payload: bytes) -> str | None:
    """The request_id of a command that failed validation, when one can be read: also from an object
    JSON parsers refuse whole (numbers out of range, NaN, nesting too deep), by reading its top level."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = {"request_id": _top_level_request_id(payload)}
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"')
_SPACE = re.compile(rb"[ \t\r\n]*")


def _top_level_request_id(payload: bytes) -> str | None:
    """Scans a JSON object's top level for a string `request_id`, skipping every other value by
    bracket depth (strings respected) without parsing it: linear, no recursion."""
    pos = _SPACE.match(payload, 0).end()  # type: ignore[union-attr]
    if payload[pos : pos + 1] != b"{":
        return None
    pos += 1
    while True:
        pos = _SPACE.match(payload, pos).end()  # type: ignore[union-attr]
        key = _STRING.match(payload, pos)
        if key is None:
            return None
        pos = _SPACE.match(payload, key.end()).end()  # type: ignore[union-attr]
        if payload[pos : pos + 1] != b":":
            return None
        pos = _SPACE.match(payload, pos + 1).end()  # type: ignore[union-attr]
        value = _STRING.match(payload, pos)
        if key.group() == b'"request_id"':
            if value is None:
                return None
            try:
                found = orjson.loads(value.group())
            except orjson.JSONDecodeError:
                return None
            return found if isinstance(found, str) else None
        if value is not None:
            pos = value.end()
        else:  # skip a number, literal, array or object: to the next top-level comma or the end
            depth = 0
            while pos < len(payload):
                ch = payload[pos : pos + 1]
                if ch == b'"':
                    string = _STRING.match(payload, pos)
                    if string is None:
                        return None
                    pos = string.end()
                    continue
                if ch in b"[{":
                    depth += 1
                elif ch in b"]}":
                    if depth == 0:
                        break
                    depth -= 1
                elif ch == b"," and depth == 0:
                    break
                pos += 1
        pos = _SPACE.match(payload, pos).end()  # type: ignore[union-attr]
        if payload[pos : pos + 1] != b",":
            return None
        pos += 1


class Service:
    def __init__(
        self,
        uow: UnitOfWork,
        *,
        epoch: str,
        max_payload: int = 64 * 1024,
        clock: Callable[[], int] = wall_clock_ms,
        ids: Callable[[str], str] = new_id,
        transient: tuple[type[BaseException], ...] = (),
        limiter: RateLimiter | None = None,
        broadcast_presence: bool = True,
        max_event: int = DEFAULT_MAX_EVENT,
        metrics: Metrics | None = None,
        cost: CostBudget | None = None,
    ) -> None:
        self.uow = uow
        self.metrics = metrics or Metrics()
        self.epoch = epoch
        self.max_payload = max_payload
        self.clock = clock
        self.ids = ids
        self.transient = transient  # storage outages: propagate so the batch is retried, never answered
        self.limiter = limiter
        self.cost = cost  # the events each user's commands cause, per second
        self.broadcast_presence = broadcast_presence
        self.max_event = max_event  # bytes: no larger event is ever stored in the outbox or published
        self._wire: Wire = {}  # events of the batch in progress, serialized while measuring them
        self._known: set[str] = set()  # senders whose user row is committed: no need to look them up again
        self._registered: set[str] = set()  # senders registered by the transaction in progress
        self._rows_read = 0  # messages the command being handled read (a page asks for `limit`)
        self._flood_warning = OncePer(60_000)  # one warning per rate-limited user per minute

    def handle_batch(
        self,
        items: Sequence[Inbound],
        published: Sequence[str] = (),
        *,
        admitted: bool = False,
        within: Callable[[Store], None] | None = None,
    ) -> Batch:
        """Applies the commands in order in one transaction, which also stores their events in the
        outbox and forgets the `published` batches; returns what to publish once it committed.

        Commands over their sender's rate limit are refused before any parsing or storage work,
        unless the caller did that already (`admitted`: the MQTT adapter refuses without storage).
        `within` runs inside the transaction after the commands: a scale-out worker fences the batch
        there (raising aborts the whole transaction).
        """
        out: list[core.Delivery] = []
        self._registered = set()
        self._wire = {}
        if items and not published and within is None and all(item.command == "typing" for item in items):
            return self._ephemeral(items, admitted)
        charged: list[tuple[str, int]] = []
        try:
            with self.uow.transaction() as store:
                store.forget_outbox(published)
                for item in items:
                    refused = None if admitted else self.refusal(item)
                    if refused is None:
                        refused = self._over_cost(item)  # again: the batch's earlier commands spent some
                    if refused is None:
                        delivered = self._handle(store, item)
                        if self.cost is not None and not item.queued:
                            cost = max(cost_of(delivered), 1 + self._rows_read)
                            self.cost.charge(item.user_id, cost, self.clock())
                            charged.append((item.user_id, cost))
                        refused = delivered
                    out.extend(refused)
                if within is not None:
                    within(store)
                batch = self._outbox(store, out)
        except BaseException:
            if self.cost is not None:  # not committed: the batch will be retried, so nothing was spent
                for user_id, cost in charged:
                    self.cost.charge(user_id, -cost, self.clock())
            raise
        self._known |= self._registered  # committed: these senders' rows exist now
        return batch

    def handle(self, item: Inbound) -> list[core.Delivery]:
        return self.handle_batch([item]).deliveries

    def forget(self, published: Sequence[str]) -> None:
        """Drops the outbox entries of batches the broker has acknowledged."""
        with self.uow.transaction() as store:
            store.forget_outbox(published)

    def pending(self) -> list[OutboxEntry]:
        """Events committed but maybe never published (the bridge stopped in between), oldest first."""
        with self.uow.transaction() as store:
            return store.pending_outbox()

    def _outbox(self, store: Store, deliveries: list[core.Delivery]) -> Batch:
        batch = batch_of(self.ids("b"), deliveries, self._wire)
        self._wire = {}
        store.add_outbox(batch.entries)
        return batch

    def _ephemeral(self, items: Sequence[Inbound], admitted: bool) -> Batch:
        """Typing only: read what it needs without a transaction and store nothing, not even its
        errors (they change nothing; one lost in a crash is as harmless as a lost typing event)."""
        out: list[core.Delivery] = []
        with self.uow.reading() as store:
            for item in items:
                refused = None if admitted else self.refusal(item)
                if refused is None:
                    refused = self._over_cost(item)
                if refused is None:
                    refused = self._handle(store, item)
                    if self.cost is not None and not item.queued:  # typing events cost like any
                        self.cost.charge(item.user_id, len(refused), self.clock())
                out.extend(refused)
        return batch_of("", out)

    def refusal(self, item: Inbound) -> list[core.Delivery] | None:
        """None when the command may run; otherwise its `rate-limited` answer (it does nothing): over
        the count of commands, or in debt for the events its sender's commands caused. Needs no
        storage. Wills (`disconnect`) always go through, and so do queued commands: the broker limited
        them when they were published, and the bridge being away is no flood."""
        if self.limiter is None or item.command == "disconnect" or item.queued:
            return self._over_cost(item)
        now = self.clock()
        wait = self.limiter.take(item.user_id, now)
        if not wait:
            return self._over_cost(item)
        return self._rate_limited(item, wait, f"too many commands; retry in {wait:.3f}s")

    def over_cost(self, item: Inbound) -> list[core.Delivery] | None:
        """As `refusal` for a command whose rate limit was checked already: its cost budget only."""
        return self._over_cost(item)

    def _over_cost(self, item: Inbound) -> list[core.Delivery] | None:
        if self.cost is None or item.command == "disconnect" or item.queued:
            return None
        wait = self.cost.wait(item.user_id, self.clock())
        if not wait:
            return None
        return self._rate_limited(
            item,
            wait,
            f"your commands caused too many events (one per recipient); retry in {wait:.3f}s",
        )

    def _rate_limited(self, item: Inbound, wait: float, message: str) -> list[core.Delivery]:
        if self._flood_warning.due(item.user_id, self.clock()):
            log.warning("%s is over its rate limit; its commands are refused with rate-limited", item.user_id)
        self.metrics.rate_limited.inc()
        command = item.command if item.command in p.COMMANDS else None
        self.metrics.count_command(command or "unknown", "rate-limited")
        error = RateLimited(message, retry_after=wait)
        return [self._error(item.user_id, error, command, request_id_of(item.payload))]

    def internal_errors(self, items: Sequence[Inbound]) -> Batch:
        """Answers for commands whose batch could not be committed at all (not stored: no outbox)."""
        failure = InternalError("the bridge failed to apply the command; nothing was done")
        for item in items:
            command = item.command if item.command in p.COMMANDS else "unknown"
            self.metrics.count_command(command, "internal")
        errors = [
            self._error(
                item.user_id,
                failure,
                item.command if item.command in p.COMMANDS else None,
                request_id_of(item.payload),
            )
            for item in items
            if item.command != "disconnect"
        ]
        return Batch("", errors, encode(errors, ""))

    def expire_sessions(self) -> Batch:
        """Ends sessions that were not re-announced since this bridge started."""
        with self.uow.transaction() as store:
            ctx = self._context(store, "", None)
            count = core.expire_sessions(ctx)
            batch = self._outbox(store, ctx.out)
        if count:
            log.info("ended %d session(s) not re-announced after the restart", count)
        return batch

    def _context(self, store: Store, sender: str, request_id: str | None) -> core.Context:
        return core.Context(
            store,
            sender,
            self.clock(),
            self.ids,
            self.epoch,
            request_id,
            broadcast_presence=self.broadcast_presence,
            max_event=self.max_event,
        )

    def _handle(self, store: Store, item: Inbound) -> list[core.Delivery]:
        command_name = item.command if item.command in p.COMMANDS else None
        request_id = None
        started = time.perf_counter()
        outcome = "ok"
        self._rows_read = 0
        try:
            cmd = parse(item, self.max_payload)
            request_id = cmd.request_id
            out = self._apply(store, item.user_id, cmd)
            if isinstance(cmd, (p.GetMessages, p.GetPriorMessages)) and any(
                isinstance(data := getattr(d.payload, "data", None), p.MessagesData) and data.has_more
                for d in out
            ):
                # a page cut short (by the payload limit, or more to come) read `limit` rows, however
                # few of them fit the answer; one that reached the end read what it carries
                self._rows_read = cmd.limit
            if isinstance(cmd, p.Connect):
                log.info("%s connected (session %s)", item.user_id, cmd.session_id)
            elif isinstance(cmd, p.Disconnect):
                log.info(
                    "%s disconnected (session %s, %s)", item.user_id, cmd.session_id, cmd.reason or "client"
                )
        except ChatError as exc:
            outcome = exc.code
            if request_id is None and not isinstance(exc, PayloadTooLarge):
                request_id = request_id_of(item.payload)
            out = [self._error(item.user_id, exc, command_name, request_id)]
        # (an outage propagates above: the batch is retried and counted when it is handled)
        label = command_name or "unknown"
        self.metrics.count_command(label, outcome)
        self.metrics.time_command(label, time.perf_counter() - started)
        return out

    def _apply(self, store: Store, sender: str, cmd: p.Command) -> list[core.Delivery]:
        handler = handlers.HANDLERS[type(cmd)]
        if isinstance(cmd, p.Typing):  # writes nothing: no savepoint, no registration
            ctx = self._context(store, sender, cmd.request_id)
            try:
                handler(cmd, ctx)
            except ChatError:
                raise
            except self.transient:
                raise
            except Exception:
                log.exception("typing by %s failed", sender)
                raise InternalError("the bridge failed to relay typing; nothing was done") from None
            return ctx.out
        for attempt in (1, 2):
            ctx = self._context(store, sender, cmd.request_id)
            try:
                with store.atomic():
                    if not isinstance(cmd, p.Connect) and sender not in self._known:
                        core.ensure_user(ctx)  # connect registers itself, with its display name
                    handler(cmd, ctx)
                    self._measure(ctx.out)  # inside the savepoint: an event too large undoes the command
                self._registered.add(sender)
                return ctx.out
            except Conflict:
                if attempt == 2:
                    log.exception("%s by %s kept conflicting", cmd.name, sender)
                    raise InternalError("a concurrent change conflicted; retry the command") from None
            except ChatError:
                raise
            except self.transient:
                raise
            except Exception:
                log.exception("%s by %s failed", cmd.name, sender)
                raise InternalError("the bridge failed to apply the command; nothing was done") from None
        raise AssertionError("unreachable")

    def _measure(self, deliveries: list[core.Delivery]) -> None:
        """Serializes the command's events; `payload-too-large` when one is over `max_event`, so that
        no event a broker would refuse ever reaches the outbox."""
        measured: Wire = {}
        for d in deliveries:
            size = len(serialized(d.payload, measured))
            if size > self.max_event:
                raise PayloadTooLarge(
                    f"the {getattr(d.payload, 'type', 'event')} event would be {size} bytes, over the "
                    f"bridge's limit of {self.max_event}; nothing was done (ask for smaller pages)"
                )
        self._wire.update(measured)

    def _error(
        self, user_id: str, exc: ChatError, command: str | None, request_id: str | None
    ) -> core.Delivery:
        retry_after = getattr(exc, "retry_after", None)
        data = p.ErrorData(
            code=exc.code,
            message=exc.message,
            command=command,
            retry_after=retry_after,
        )
        event = p.Error(ts=p.iso_ms(self.clock()), request_id=request_id, event_id=self.ids("v"), data=data)
        return core.Delivery("inbox", user_id, event)
