"""schemas/ is generated from the models: it must not drift, and it must describe what the bridge sends."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from world import World

from bridge import protocol as p
from bridge.schemagen import SCHEMAS, render


def test_committed_schemas_match_the_models() -> None:
    files = render()
    on_disk = {str(f.relative_to(SCHEMAS)) for f in SCHEMAS.rglob("*") if f.is_file()}
    assert on_disk == set(files), "schemas/ has files the models do not generate (or lacks some)"
    stale = [path for path, text in files.items() if (SCHEMAS / path).read_text() != text]
    assert not stale, f"regenerate with `python -m bridge.schemagen`: {stale}"


def test_every_command_and_event_has_a_schema() -> None:
    files = render()
    for name in p.COMMANDS:
        assert f"commands/{name}.json" in files
    for event in p.EVENTS:
        assert f"events/{event.model_fields['type'].default}.json" in files


def test_asyncapi_describes_topics_qos_retain_and_the_will() -> None:
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {
        "chat/v1/users/{user}/commands/{command}",
        "chat/v1/users/{user}/inbox",
        "chat/v1/conversations/{conversation}/events",
        "chat/v1/presence/{user}",
        "chat/v1/bridge/status",
        "chat/v1/notifications/{user}",
    }
    will = doc["servers"]["broker"]["bindings"]["mqtt"]["lastWill"]
    assert will["topic"] == "chat/v1/users/{user}/commands/disconnect" and will["qos"] == 1
    assert doc["operations"]["receivePresence"]["bindings"]["mqtt"]["retain"] is True
    assert doc["operations"]["sendCommand"]["bindings"]["mqtt"]["qos"] == 1
    assert doc["operations"]["receiveTyping"]["bindings"]["mqtt"]["qos"] == 0
    assert doc["components"]["messages"]["evt-typing"]["bindings"]["mqtt"]["qos"] == 0


def _validator(path: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / path).read_text()))


def test_what_the_bridge_sends_validates_against_the_schemas() -> None:
    w = World()
    outs = [w.do("alice", "connect", session_id="a"), w.do("bob", "connect", session_id="b")]
    cid = w.do("alice", "create-conversation", kind="group", participants=["bob"]).data["conversation"][
        "conversation_id"
    ]
    outs.append(w.do("alice", "invite", conversation_id=cid, user_ids=["bob"]))
    mid = w.do("alice", "send-message", conversation_id=cid, body="x").data["message"]["message_id"]
    outs += [
        w.do("bob", "reply", message_id=mid, body="y"),
        w.do("bob", "get-messages", conversation_id=cid, since_seq=0),
        w.do("bob", "get-prior-messages", conversation_id=cid),
        w.do("bob", "get-conversations"),
        w.do("bob", "get-participants", conversation_id=cid),
        w.do("bob", "get-active-users"),
        w.do("bob", "mark-read", conversation_id=cid, seq=1),
        w.do("bob", "typing", conversation_id=cid, typing=True),
        w.do("alice", "edit-message", message_id=mid, body="x2"),
        w.do("bob", "react", message_id=mid, emoji="👍"),
        w.do("bob", "search-messages", query="x2"),
        w.do("bob", "get-messages", conversation_id=cid, since_rev=0),
        w.do("alice", "delete-message", message_id=mid),
        w.do("bob", "disconnect", session_id="b"),
        w.do("alice", "send-message", conversation_id=cid, body="while bob is away"),
        w.do("bob", "leave", conversation_id=cid),
        w.do("bob", "nope"),
        w.do("alice", "remove-conversation", conversation_id=cid),
        w.do("alice", "disconnect", session_id="a"),
    ]
    seen = set()
    for out in outs:
        for d in out.deliveries:
            body = json.loads(d.payload.model_dump_json())
            special = {"presence": "presence.json", "notification": "notification.json"}
            path = special[d.kind] if d.kind in special else f"events/{body['type']}.json"
            _validator(path).validate(body)
            seen.add(path)
    assert len(seen) >= 20, seen


@pytest.mark.parametrize(
    ("name", "example"),
    [
        ("connect", {"session_id": "s1", "display_name": "Alice", "request_id": "r1"}),
        ("send-message", {"conversation_id": "global", "body": "hi", "client_msg_id": "c1"}),
        ("get-messages", {"conversation_id": "global", "since": "2026-11-24T10:00:00.123Z", "limit": 10}),
    ],
)
def test_valid_commands_validate(name: str, example: dict[str, object]) -> None:
    _validator(f"commands/{name}.json").validate(example)


def test_schemas_reject_what_the_bridge_rejects() -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validator("commands/send-message.json").validate({"conversation_id": "global", "body": ""})
    with pytest.raises(jsonschema.ValidationError):
        _validator("commands/create-conversation.json").validate({"kind": "party", "participants": ["b"]})


def test_schema_dir_is_the_repository_one() -> None:
    assert Path(__file__).resolve().parents[2] / "schemas" == SCHEMAS
