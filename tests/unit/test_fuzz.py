"""Fuzzing every command topic with payloads drawn from the JSON Schemas, mutated, and random bytes.

The bridge must never crash; every invalid payload gets exactly one error and changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from world import World

from bridge import protocol as p
from bridge.memory import MemoryUnitOfWork
from bridge.schemagen import SCHEMAS
from bridge.service import request_id_of

TRIED: dict[str, int] = {}
ACCEPTED: dict[str, int] = {}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def world() -> World:
    w = World()
    w.do("alice", "connect", session_id="a1")
    w.do("bob", "connect", session_id="b1")
    w.do("alice", "create-conversation", kind="direct", participants=["bob"])
    w.do("alice", "send-message", conversation_id="global", body="root")
    return w


def schema(name: str) -> dict[str, Any]:
    body = json.loads((SCHEMAS / f"commands/{name}.json").read_text())
    body.pop("$id", None)
    return body


def real_ids() -> list[str]:
    """Ids that exist in `world()` (ids are deterministic there), so valid commands hit real targets."""
    store = world().uow.store  # type: ignore[attr-defined]
    return [*store._s.conversations, *store._s.message_index, *store._s.users]


IDS = ["zed", *real_ids()]


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for the (simple) schemas our models generate; ids are drawn partly from real ones."""
    if "anyOf" in node:
        return st.one_of([from_schema(option) for option in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(node.get("minimum", -(2**63)), node.get("maximum", 2**63))
    if kind == "array":
        return st.lists(
            from_schema(node["items"]),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 5), 5),
        )
    if kind == "string":
        if node.get("format") == "date-time":
            return st.datetimes(timezones=st.just(__import__("datetime").UTC)).map(lambda d: d.isoformat())
        if "pattern" in node:
            return st.sampled_from(IDS) | st.from_regex(node["pattern"], fullmatch=True)
        return st.text(min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 50), 50))
    if kind == "object" or "properties" in node:
        required = node.get("required", [])
        optional = [k for k in node["properties"] if k not in required]
        return st.fixed_dictionaries(
            {k: from_schema(node["properties"][k]) for k in required},
            optional={k: from_schema(node["properties"][k]) for k in optional},
        )
    raise AssertionError(f"no strategy for {node}")


def payloads(name: str) -> st.SearchStrategy[bytes]:
    valid = from_schema(schema(name))
    mutated = st.tuples(valid, st.text(max_size=20), json_values).map(
        lambda t: {**t[0], t[1]: t[2]} if t[1] else t[0]
    ) | st.tuples(valid, st.integers(0, 10)).map(
        lambda t: {k: v for i, (k, v) in enumerate(t[0].items()) if i != t[1]}
    )
    return (valid | mutated | json_values).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300)


def check(w: World, user: str, name: str, payload: bytes) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    assert isinstance(w.uow, MemoryUnitOfWork)
    before = w.state()
    out = w.raw(user, name, payload)  # must not raise
    rid = request_id_of(payload)
    errors = [e for e in out.inbox(user) if e["type"] == "error"]
    if errors:
        assert len(out.deliveries) == 1 and len(errors) == 1, out.deliveries
        assert errors[0]["data"]["code"] in ("bad-request", "not-found", "forbidden")
        assert w.state() == before, "an invalid command changed state"
    else:
        ACCEPTED[name] = ACCEPTED.get(name, 0) + 1
        if name == "typing":  # no answer when it succeeds; only QoS 0 copies, nothing stored
            assert not out.inbox(user) and all(d.qos == 0 for d in out.deliveries), out.deliveries
            assert w.state() == before, "typing changed state"
        elif name != "disconnect" and rid:
            answers = [e["request_id"] for e in out.inbox(user)].count(rid)
            assert answers == 1, "a valid command needs exactly one answer"
        elif name != "disconnect":
            assert out.inbox(user), "a valid command got no answer"


@pytest.mark.parametrize("name", sorted(p.COMMANDS))
def test_fuzz_command(name: str) -> None:
    w = world()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(user=st.sampled_from(["alice", "bob", "zed"]), payload=payloads(name))
    def run(user: str, payload: bytes) -> None:
        check(w, user, name, payload)

    run()


def test_fuzz_report() -> None:
    """Runs last (alphabetically after test_fuzz_command): prints how many inputs were tried."""
    total = sum(TRIED.values())
    accepted = sum(ACCEPTED.values())
    print(
        f"\nfuzzed {total} payloads over {len(TRIED)} command topics: {accepted} accepted, "
        f"{total - accepted} answered with an error; accepted per topic: {ACCEPTED}"
    )
    assert total == 0 or len(TRIED) == len(p.COMMANDS)
