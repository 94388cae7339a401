"""Every bad input gets its error code, echoes the request_id when readable, and changes nothing."""

from __future__ import annotations

import pytest
from world import World

from bridge.memory import MemoryUnitOfWork


def snapshot(w: World) -> object:
    assert isinstance(w.uow, MemoryUnitOfWork)
    return w.state()


@pytest.fixture
def w() -> World:
    world = World()
    world.do("alice", "connect", session_id="a1")
    world.do("bob", "connect", session_id="b1")
    world.do("alice", "create-conversation", kind="direct", participants=["bob"])
    return world


CASES = [
    ("send-message", b"not json", "bad-request"),
    ("send-message", b"[1, 2]", "bad-request"),
    ("send-message", b'"a string"', "bad-request"),
    ("send-message", b"", "bad-request"),
    ("send-message", b'{"conversation_id": "global"}', "bad-request"),
    ("send-message", b'{"conversation_id": "global", "body": ""}', "bad-request"),
    ("send-message", b'{"conversation_id": "global", "body": 5}', "bad-request"),
    ("send-message", b'{"conversation_id": "global", "body": "' + b"x" * 8001 + b'"}', "bad-request"),
    ("send-message", b'{"conversation_id": "global", "body": "x", "client_msg_id": ""}', "bad-request"),
    ("send-message", b'{"conversation_id": "a/b", "body": "x"}', "bad-request"),
    ("send-message", b'{"conversation_id": "global", "body": "x", "request_id": 7}', "bad-request"),
    ("send-message", b'{"conversation_id": "nope", "body": "x"}', "not-found"),
    ("connect", b"{}", "bad-request"),
    ("connect", b'{"session_id": ""}', "bad-request"),
    ("connect", b'{"session_id": "' + b"s" * 65 + b'"}', "bad-request"),
    ("connect", b'{"session_id": "s", "display_name": 3}', "bad-request"),
    ("create-conversation", b'{"kind": "party", "participants": ["bob"]}', "bad-request"),
    ("create-conversation", b'{"kind": "direct", "participants": "bob"}', "bad-request"),
    ("create-conversation", b'{"kind": "direct", "participants": ["alice"]}', "bad-request"),
    ("create-conversation", b'{"kind": "direct", "participants": ["nobody"]}', "not-found"),
    ("get-messages", b'{"conversation_id": "global"}', "bad-request"),
    ("get-messages", b'{"conversation_id": "global", "since_seq": 1.5}', "bad-request"),
    ("get-messages", b'{"conversation_id": "global", "since_seq": true}', "bad-request"),
    ("disconnect", b'{"reason": "client"}', "bad-request"),
    ("disconnect", b'{"session_id": "a1", "reason": "bored"}', "bad-request"),
    ("frobnicate", b"{}", "unknown-command"),
    ("send-message", b'{"conversation_id": "global", "body": "' + b"x" * 70000 + b'"}', "payload-too-large"),
]


@pytest.mark.parametrize(("command", "payload", "code"), CASES)
def test_bad_input_is_answered_and_changes_nothing(w: World, command: str, payload: bytes, code: str) -> None:
    before = snapshot(w)
    out = w.raw("alice", command, payload)
    assert [e["type"] for e in out.inbox("alice")] == ["error"]
    assert len(out.deliveries) == 1
    error = out.inbox("alice")[0]["data"]
    assert error["code"] == code and error["message"]
    assert error["command"] == (command if command != "frobnicate" else None)
    assert snapshot(w) == before


def test_request_id_is_echoed_on_errors_when_readable(w: World) -> None:
    out = w.raw("alice", "send-message", b'{"request_id": "q-1", "conversation_id": "global"}')
    assert out.answer["request_id"] == "q-1" and out.error == "bad-request"
    out = w.raw("alice", "nope", b'{"request_id": "q-2"}')
    assert out.answer["request_id"] == "q-2" and out.error == "unknown-command"


def test_unknown_fields_are_ignored(w: World) -> None:
    out = w.raw("alice", "send-message", b'{"conversation_id": "global", "body": "x", "colour": "red"}')
    assert out.inbox("alice")[0]["type"] == "message-added"


def test_a_handler_crash_is_answered_internal_and_rolled_back(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge import core

    def explode(*_: object) -> None:
        raise RuntimeError("boom")

    real_post = core.post

    def half_then_crash(ctx: core.Context, *args: object) -> None:
        real_post(ctx, *args)  # type: ignore[arg-type]
        explode()

    monkeypatch.setattr(core, "post", half_then_crash)
    before = snapshot(w)
    out = w.do("alice", "send-message", conversation_id="global", body="x")
    assert out.error == "internal"
    assert snapshot(w) == before


def test_rate_limit_answers_rate_limited_with_retry_after_and_changes_nothing() -> None:
    from bridge.limits import RateLimiter

    w = World()
    w.service.limiter = RateLimiter(rate=2, burst=3)
    w.now = 1_000_000  # the fake clock advances 1 ms per reading
    sent = [
        w.do("alice", "send-message", conversation_id="global", body=f"m{i}", request_id=f"q{i}")
        for i in range(5)
    ]
    assert [o.answer["type"] for o in sent] == ["message-added"] * 3 + ["error"] * 2
    limited = sent[3].answer
    assert limited["request_id"] == "q3" and limited["data"]["code"] == "rate-limited"
    assert limited["data"]["command"] == "send-message"
    assert 0.4 < limited["data"]["retry_after"] <= 0.5
    # bob is not affected by alice's flood; alice's will still goes through
    assert w.do("bob", "send-message", conversation_id="global", body="hi").answer["type"] == "message-added"
    w.do("alice", "connect", session_id="a2")  # (limited, but disconnect below is exempt)
    w.now += 10_000
    assert (
        w.do("alice", "send-message", conversation_id="global", body="later").answer["type"]
        == "message-added"
    )
    history = w.do("bob", "get-messages", conversation_id="global", since_seq=0).data["messages"]
    assert [m["body"] for m in history] == ["m0", "m1", "m2", "hi", "later"]


def test_every_refused_command_is_answered_however_long_the_sender_ignores_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exactly one answer per command: a flooder's refusals are all answered (the broker's guards stop
    floods before the bridge), nothing changes, and the log gets one warning, not one per refusal."""
    from bridge.limits import RateLimiter

    w = World()
    w.service.limiter = RateLimiter(rate=1, burst=2)
    w.now = 1_000_000  # the fake clock advances 1 ms per reading: refills are negligible here
    before = None
    outs = []
    for i in range(50):
        if i == 2:
            before = snapshot(w)
        outs.append(w.do("alice", "send-message", conversation_id="global", body=f"m{i}", request_id=f"q{i}"))
    assert [o.types("alice") for o in outs] == [["message-added"]] * 2 + [["error"]] * 48
    assert all(
        o.answer["request_id"] == f"q{i}" and o.error == "rate-limited" for i, o in enumerate(outs) if i >= 2
    )
    assert all(len(o.deliveries) == 1 for o in outs[2:])  # nothing for anyone else
    assert snapshot(w) == before  # refused commands change nothing
    warnings = [r.message for r in caplog.records if "rate limit" in r.message]
    assert warnings == ["alice is over its rate limit; its commands are refused with rate-limited"]
    assert w.do("bob", "send-message", conversation_id="global", body="hi").answer["type"] == "message-added"
    w.now += 1_500
    assert w.do("alice", "get-active-users", request_id="r1").answer["type"] == "active-users"
    assert w.do("alice", "get-active-users", request_id="r2").error == "rate-limited"


def test_queued_commands_are_never_rate_limited_and_all_answered() -> None:
    """A backlog the broker queued while the bridge was away is applied, not refused: it was limited
    at publish time. Live commands after it are limited as usual."""
    import orjson

    from bridge.limits import RateLimiter
    from bridge.service import Inbound

    w = World()
    w.service.limiter = RateLimiter(rate=1, burst=2)
    w.now = 1_000_000
    backlog = [
        Inbound(
            "alice",
            "send-message",
            orjson.dumps({"conversation_id": "global", "body": f"m{i}", "request_id": f"q{i}"}),
            queued=True,
        )
        for i in range(100)
    ]
    batch = w.service.handle_batch(backlog)
    answers = [d.payload for d in batch.deliveries if d.kind == "inbox" and d.payload.request_id]
    assert [a.request_id for a in answers] == [f"q{i}" for i in range(100)]
    assert {a.type for a in answers} == {"message-added"}
    history = w.do("bob", "get-messages", conversation_id="global", since_seq=0, limit=500).data["messages"]
    assert [m["body"] for m in history] == [f"m{i}" for i in range(100)]
    w.do("alice", "get-active-users")
    w.do("alice", "get-active-users")
    assert w.do("alice", "get-active-users").error == "rate-limited"


def test_disconnect_is_never_rate_limited() -> None:
    from bridge.limits import RateLimiter

    w = World()
    w.service.limiter = RateLimiter(rate=1, burst=1)
    w.do("alice", "connect", session_id="a1")
    w.do("bob", "connect", session_id="b1")
    assert w.do("alice", "get-active-users").error == "rate-limited"
    out = w.do("alice", "disconnect", session_id="a1", reason="lost")
    assert out.recipients("user-disconnected") == ["bob"]


def test_idle_buckets_are_forgotten() -> None:
    from bridge.limits import RateLimiter

    limiter = RateLimiter(rate=10, burst=10, max_tracked=3)
    for i in range(3):
        limiter.take(f"u{i}", 0)
    limiter.take("late", 5_000)  # the others refilled long ago
    assert set(limiter._buckets) == {"late"}


@pytest.mark.parametrize(
    "name",
    [
        "nul\x00name",
        "two\nlines",
        "carriage\rreturn",
        "tab\there",
        "escape\x1b[31m",
        "c1\x85control",
        "\u202egnp.exe",  # right-to-left override
        "iso\u2066late",
        "zero\u200bwidth",
        "joiner\u200d",
        "\ufeffbom",
        "line\u2028separator",
        "b\u034fob",  # combining grapheme joiner: invisible
        "\u115fbob",  # Hangul choseong filler: a blank that is not a space
        "bob\u2800",  # braille blank
    ],
)
def test_display_names_and_titles_refuse_unshowable_characters(w: World, name: str) -> None:
    before = snapshot(w)
    out = w.do("alice", "connect", session_id="a9", display_name=name)
    assert out.error == "bad-request" and "display_name" in out.answer["data"]["message"]
    out = w.do("alice", "create-conversation", kind="group", participants=["bob"], title=name)
    assert out.error == "bad-request"
    assert snapshot(w) == before


@pytest.mark.parametrize("name", ["Zoë 🎉", "李小龍", "O'Brien-Smith", "Ana María"])
def test_ordinary_display_names_are_kept(w: World, name: str) -> None:
    assert w.do("alice", "connect", session_id="a9", display_name=name).data["user"]["display_name"] == name


def test_a_user_id_differing_only_in_case_from_an_existing_one_is_refused(w: World) -> None:
    before = snapshot(w)
    for user, command, fields in (
        ("ALICE", "connect", {"session_id": "x"}),
        ("Alice", "send-message", {"conversation_id": "global", "body": "I am alice"}),
        ("BoB", "get-active-users", {}),
    ):
        out = w.do(user, command, **fields)
        assert out.error == "forbidden" and "only in case" in out.answer["data"]["message"]
    assert snapshot(w) == before
    assert w.do("alice", "get-active-users").answer["type"] == "active-users"
    assert w.do("carol", "connect", session_id="c1").answer["type"] == "connected"  # new ids still register


@pytest.mark.parametrize(
    "payload",
    [
        b'{"request_id": "q", "conversation_id": "global", "x": 1e400}',
        b'{"x": 1e400, "request_id": "q", "conversation_id": "global"}',
        b'{"request_id": "q", "conversation_id": "global", "x": NaN}',
        b'{"x": -Infinity, "request_id": "q"}',
        b'{"x": ' + b"9" * 500 + b', "conversation_id": "global", "request_id": "q"}',
        b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b', "request_id": "q", "conversation_id": "global"}',
        b'{"x": {"a": "}\\"]", "b": [1, {"c": ' + b"[" * 3000 + b"]" * 3000 + b'}]}, "request_id": "q"}',
    ],
)
def test_request_id_is_echoed_even_when_json_parsers_refuse_the_payload(w: World, payload: bytes) -> None:
    """No body: every one of these is bad-request, answered with the request_id it carries."""
    before = snapshot(w)
    out = w.raw("alice", "send-message", payload)
    assert out.error == "bad-request" and out.answer["request_id"] == "q"
    assert snapshot(w) == before


@pytest.mark.parametrize(
    "payload",
    [
        b'{"request_id": {"request_id": "nested"}, "x": NaN}',
        b'{"a": "request_id", "x": NaN}',
        b'[{"request_id": "q"}, NaN]',
        b'{"request_id": "q"',  # never closed: still readable up to there
    ],
)
def test_only_a_top_level_string_request_id_is_echoed(w: World, payload: bytes) -> None:
    (answer,) = w.raw("alice", "send-message", payload).inbox("alice")
    expected = "q" if payload.endswith(b'"q"') else None
    assert answer["data"]["code"] == "bad-request" and answer["request_id"] == expected


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("send-message", {"conversation_id": "global", "body": "nul \x00 inside"}),
        ("send-message", {"conversation_id": "global", "body": "x", "client_msg_id": "c\x00"}),
        ("connect", {"session_id": "s\x00"}),
        ("disconnect", {"session_id": "s\x00"}),
    ],
)
def test_nul_characters_are_bad_request(w: World, command: str, fields: dict[str, str]) -> None:
    before = snapshot(w)
    assert w.do("alice", command, **fields).error == "bad-request"
    assert snapshot(w) == before
