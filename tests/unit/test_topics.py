"""The topic layout, retain policy, client id rule and topic rules (bridge/topics.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import protocol as p
from bridge import schemagen
from bridge.topics import (
    BRIDGE_ACCOUNT,
    COMMAND_NAMES,
    OBSERVER_ACCOUNT,
    PUSH_ACCOUNT,
    Topics,
    client_id_allowed,
    client_id_owner,
    is_user_id,
    retained,
)

T = Topics("chat/v1")


def test_layout() -> None:
    assert T.commands == "chat/v1/users/+/commands/+"
    assert T.status == "chat/v1/bridge/status"
    assert T.of("inbox", "alice") == "chat/v1/users/alice/inbox"
    assert T.of("conversation", "c_1") == "chat/v1/conversations/c_1/events"
    assert T.of("presence", "alice") == "chat/v1/presence/alice"
    assert T.of("notification", "alice") == "chat/v1/notifications/alice"
    assert T.of("status", "") == T.status
    with pytest.raises(ValueError):
        T.of("nowhere", "alice")


def test_parse_command() -> None:
    assert T.parse_command("chat/v1/users/alice/commands/send-message") == ("alice", "send-message")
    # unknown names are parsed: the bridge answers them with unknown-command
    assert T.parse_command("chat/v1/users/alice/commands/fly") == ("alice", "fly")
    assert Topics("a/b/c").parse_command("a/b/c/users/bob/commands/connect") == ("bob", "connect")
    for topic in (
        "chat/v1/users/alice\n/commands/connect",
        "chat/v1/users/al ice/commands/connect",
        "chat/v1/users//commands/connect",
        "chat/v1/users/alice/commands/",
        "chat/v1/users/alice/commands/connect/extra",
        "chat/v1/users/alice/inbox",
        "chat/v2/users/alice/commands/connect",
        "xchat/v1/users/alice/commands/connect",
        "chat/v1/users/alice/command/connect",
    ):
        assert T.parse_command(topic) is None, topic


def test_user_ids_are_matched_whole() -> None:
    assert is_user_id("alice") and is_user_id("A-b_9") and is_user_id("x" * 64)
    for bad in ("alice\n", "alice\r\n", "", "x" * 65, "al:ice", "al/ice", "al+", "é"):
        assert not is_user_id(bad), repr(bad)


def test_client_id_rule() -> None:
    for ok in ("alice", "alice:phone", "alice:web-3f9a", "alice:a.b_c-D", "alice:" + "x" * 64):
        assert client_id_allowed("alice", ok), ok
        assert client_id_owner(ok) == "alice"
    for bad in (
        "",
        "bob",
        "alicex",
        "alice:",
        "alice::x",
        "alice:x:y",
        "alice:" + "x" * 65,
        "alice:ph one",
        "alice:phone\n",
        "alice\n",
        "bob:alice",
    ):
        assert not client_id_allowed("alice", bad), repr(bad)
    assert not client_id_allowed("", "")
    assert not client_id_allowed("alice\n", "alice\n")
    assert client_id_owner("chat-bridge") == BRIDGE_ACCOUNT
    assert client_id_owner("chat-bridge:w1") == BRIDGE_ACCOUNT
    assert client_id_owner("") is None
    assert client_id_owner("x:") is None


def test_retain_policy() -> None:
    assert retained("presence") and retained("status")
    assert not any(retained(k) for k in ("inbox", "conversation", "notification"))


def test_every_protocol_command_is_known() -> None:
    assert set(p.COMMANDS) <= set(COMMAND_NAMES)
    assert len(set(COMMAND_NAMES)) == len(COMMAND_NAMES) == 19


def test_user_rules() -> None:
    a = "alice"
    for name in COMMAND_NAMES:
        assert T.allows(a, f"chat/v1/users/alice/commands/{name}", "publish")
        assert not T.allows(a, f"chat/v1/users/alice/commands/{name}", "publish", retain=True)
        assert not T.allows(a, f"chat/v1/users/bob/commands/{name}", "publish")
    for topic in (
        "chat/v1/users/alice/commands/fly",
        "chat/v1/users/alice/commands/connect/x",
        "chat/v1/users/alice/commands",
        "chat/v1/users/alice/inbox",
        "chat/v1/users/bob/inbox",
        "chat/v1/presence/alice",
        "chat/v1/bridge/status",
        "chat/v1/conversations/c/events",
        "chat/v1/notifications/alice",
    ):
        assert not T.allows(a, topic, "publish"), topic
    assert T.allows(a, "chat/v1/users/alice/inbox", "receive")
    assert T.allows(a, "chat/v1/presence/bob", "receive")
    assert T.allows(a, "chat/v1/bridge/status", "receive")
    for topic in (
        "chat/v1/users/bob/inbox",
        "chat/v1/users/alice/commands/connect",
        "chat/v1/conversations/c/events",
        "chat/v1/notifications/alice",
    ):
        assert not T.allows(a, topic, "receive"), topic
    for bad in (None, "", "alice\n", "a+", "#", "a/b"):
        assert not T.allows(bad, "chat/v1/presence/x", "receive")
        assert not T.allows(bad, "chat/v1/users/a/commands/connect", "publish")


def test_service_account_rules() -> None:
    b = BRIDGE_ACCOUNT
    assert T.allows(b, "chat/v1/users/alice/commands/anything", "receive")
    for topic in (
        "chat/v1/users/alice/inbox",
        "chat/v1/conversations/c/events",
        "chat/v1/presence/alice",
        "chat/v1/bridge/status",
        "chat/v1/notifications/alice",
    ):
        assert T.allows(b, topic, "publish"), topic
    assert T.allows(b, T.status, "publish", retain=True)
    assert not T.allows(b, "chat/v1/users/alice/commands/connect", "publish")
    assert T.allows(b, "chat/v1/users/chat-bridge/commands/probe", "publish")
    assert not T.allows(b, "chat/v1/users/chat-bridge/commands/probe", "publish", retain=True)
    assert not T.allows("alice", "chat/v1/users/chat-bridge/commands/probe", "publish")
    assert not T.allows(b, "chat/v1/users/alice/inbox", "receive")

    assert T.allows(OBSERVER_ACCOUNT, "chat/v1/conversations/c/events", "receive")
    assert not T.allows(OBSERVER_ACCOUNT, "chat/v1/notifications/alice", "receive")
    assert not T.allows(OBSERVER_ACCOUNT, "chat/v1/users/chat-observer/commands/connect", "publish")

    assert T.allows(PUSH_ACCOUNT, "chat/v1/notifications/alice", "receive")
    assert not T.allows(PUSH_ACCOUNT, "chat/v1/conversations/c/events", "receive")
    assert not T.allows(PUSH_ACCOUNT, "chat/v1/users/chat-push/commands/connect", "publish")
    assert not any(
        T.allows(u, "chat/v1/notifications/alice", "receive") for u in ("alice", OBSERVER_ACCOUNT)
    )


def test_open_access_rules() -> None:
    o = Topics("chat/v1", open_access=True)
    for user in (None, "", "anyone", "alice"):
        assert o.allows(user, "chat/v1/users/bob/commands/send-message", "publish")
        assert not o.allows(user, "chat/v1/users/bob/commands/send-message", "publish", retain=True)
        assert o.allows(user, "chat/v1/users/bob/inbox", "receive")
        for topic in (
            "chat/v1/bridge/status",
            "chat/v1/presence/bob",
            "chat/v1/users/bob/inbox",
            "chat/v1/users/bob/commands/fly",
            "chat/v1/users/chat-bridge/commands/probe",
            "chat/v1/users/chat-bridge/commands/connect",
            "chat/v1/users/chat-push/commands/connect",
            "chat/v1/conversations/c/events",
            "elsewhere",
        ):
            assert not o.allows(user, topic, "publish"), (user, topic)
    assert o.allows(BRIDGE_ACCOUNT, "chat/v1/bridge/status", "publish", retain=True)


def test_schema_addresses_come_from_the_layout() -> None:
    doc = schemagen.asyncapi(schemagen.json_schemas())
    addresses = {c["address"] for c in doc["channels"].values()}
    layout = Topics("chat/v1")
    assert {
        layout.command("{user}", "{command}"),
        layout.inbox("{user}"),
        layout.conversation("{conversation}"),
        layout.presence("{user}"),
        layout.status,
    } <= addresses
    bindings = {op["channel"]["$ref"].split("/")[-1]: op["bindings"] for op in doc["operations"].values()}
    assert bindings["presence"]["mqtt"]["retain"] is retained("presence")
    assert bindings["bridgeStatus"]["mqtt"]["retain"] is retained("status")
    assert bindings["inbox"]["mqtt"]["retain"] is retained("inbox")
    assert bindings["commands"]["mqtt"]["retain"] is False


def test_mosquitto_acl_says_the_same() -> None:
    acl = Path(__file__).parents[2] / "mosquitto" / "acl"
    lines = [line.strip() for line in acl.read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == T.mosquitto_acl()
