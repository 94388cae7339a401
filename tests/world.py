"""A deterministic world for driving the service: a fake clock, predictable ids, any UnitOfWork."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import orjson

from bridge.core import Delivery
from bridge.memory import MemoryUnitOfWork
from bridge.model import UnitOfWork
from bridge.service import Inbound, Service


class World:
    def __init__(
        self, uow: UnitOfWork | None = None, epoch: str = "e1", *, broadcast_presence: bool = True
    ) -> None:
        self.now = 1_700_000_000_000
        self._ids = itertools.count(1)
        self.uow = uow or MemoryUnitOfWork()
        self.service = Service(
            self.uow,
            epoch=epoch,
            clock=self.clock,
            ids=lambda prefix: f"{prefix}_{next(self._ids)}",
            broadcast_presence=broadcast_presence,
        )

    def clock(self) -> int:
        self.now += 1
        return self.now

    def raw(self, user: str, command: str, payload: bytes) -> Out:
        return Out(self.service.handle(Inbound(user, command, payload)))

    def do(self, user: str, command: str, **fields: Any) -> Out:
        fields.setdefault("request_id", "r")
        return self.raw(user, command, orjson.dumps(fields))

    def state(self) -> object:
        """The chat state of the in-memory store, without the outbox (events waiting to be published).

        As good as a deep copy, and much faster: containers are copied all the way down, immutable
        values (strings, numbers, frozen dataclasses of them) are shared."""
        state = self.uow.store._s  # type: ignore[attr-defined]
        names = [f.name for f in dataclasses.fields(state) if f.name != "outbox"]
        return dataclasses.replace(state, outbox=[], **{n: _copied(getattr(state, n)) for n in names})

    def restart(self, epoch: str) -> None:
        self.service = Service(self.uow, epoch=epoch, clock=self.clock, ids=self.service.ids)


_ATOMS = (str, bytes, int, float, bool, type(None))
_FROZEN_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _frozen_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of a frozen dataclass (None for any other type), looked up once per type."""
    if cls not in _FROZEN_FIELDS:
        params = getattr(cls, "__dataclass_params__", None)
        frozen = params is not None and params.frozen
        _FROZEN_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) if frozen else None
    return _FROZEN_FIELDS[cls]


def _immutable(value: Any) -> bool:
    if isinstance(value, _ATOMS):
        return True
    if type(value) is tuple:
        return all(_immutable(v) for v in value)
    names = _frozen_fields(type(value))
    return names is not None and all(_immutable(getattr(value, n)) for n in names)


def _copied(value: Any) -> Any:
    """A copy of `value` that shares nothing mutable with it."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, set):
        return {_copied(v) for v in value}
    return value if _immutable(value) else copy.deepcopy(value)


class Out:
    """What one command produced, readable per destination."""

    def __init__(self, deliveries: list[Delivery]) -> None:
        self.deliveries = deliveries

    def inbox(self, user: str) -> list[dict[str, Any]]:
        return [
            d.payload.model_dump(mode="json") for d in self.deliveries if d.kind == "inbox" and d.key == user
        ]

    def types(self, user: str) -> list[str]:
        return [e["type"] for e in self.inbox(user)]

    def recipients(self, event_type: str) -> list[str]:
        return sorted(
            d.key
            for d in self.deliveries
            if d.kind == "inbox" and d.payload.model_dump()["type"] == event_type
        )

    def conversation_topic(self, cid: str) -> list[str]:
        return [
            d.payload.model_dump()["type"]
            for d in self.deliveries
            if d.kind == "conversation" and d.key == cid
        ]

    def presence(self) -> list[tuple[str, str]]:
        return [(d.key, d.payload.model_dump()["status"]) for d in self.deliveries if d.kind == "presence"]

    @property
    def answer(self) -> dict[str, Any]:
        answers = [
            d.payload.model_dump(mode="json")
            for d in self.deliveries
            if d.kind == "inbox" and d.payload.model_dump()["request_id"] is not None
        ]
        assert len(answers) == 1, answers
        return answers[0]

    @property
    def data(self) -> Any:
        return self.answer["data"]

    @property
    def error(self) -> str:
        assert self.answer["type"] == "error", self.answer
        return str(self.answer["data"]["code"])
