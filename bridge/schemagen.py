"""Generates `schemas/` from the wire models: `python -m bridge.schemagen [--check]`.

One JSON Schema per command and per event, the retained payloads, and
`asyncapi.yaml` (AsyncAPI 3.0) describing topics, QoS, retain flags and the
last will. Needs PyYAML (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from . import protocol as p
from .topics import DEFAULT_PREFIX, Topics

LAYOUT = Topics(DEFAULT_PREFIX)  # the addresses documented, under the default prefix

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
BASE_ID = "https://chat-bridge.invalid/schemas/v1"


def _schema(model: type[p.WireModel] | type[p.Command], path: str, description: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{BASE_ID}/{path}",
        "description": description,
        **schema,
    }


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def json_schemas() -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for name, cmd in p.COMMANDS.items():
        files[f"commands/{name}.json"] = _schema(
            cmd,
            f"commands/{name}.json",
            f"The `{name}` command, published to {{prefix}}/users/{{user}}/commands/{name}. "
            f"Unknown fields are ignored. {_doc(cmd)}".strip(),
        )
    for event in p.EVENTS:
        kind = event.model_fields["type"].default
        files[f"events/{kind}.json"] = _schema(
            event,
            f"events/{kind}.json",
            f"The `{kind}` event, as published to inboxes and conversation topics.",
        )
    files["notification.json"] = _schema(
        p.Notification,
        "notification.json",
        "(1.1) On {prefix}/notifications/{user}, QoS 1, not retained: a message for a participant "
        "without an active session, for a push gateway the operator grants.",
    )
    files["presence.json"] = _schema(p.Presence, "presence.json", "Retained on {prefix}/presence/{user}.")
    files["bridge-status.json"] = _schema(
        p.BridgeStatus,
        "bridge-status.json",
        "Retained on {prefix}/bridge/status; the bridge's will sets it offline.",
    )
    return files


def _ref(path: str) -> dict[str, str]:
    return {"$ref": f"./{path}"}


def asyncapi(schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    qos1 = {"mqtt": {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}}
    qos0 = {"mqtt": {"qos": 0, "retain": False, "bindingVersion": "0.2.0"}}
    retained = {"mqtt": {"qos": 1, "retain": True, "bindingVersion": "0.2.0"}}
    user_param = {
        "description": "a user id: ^[A-Za-z0-9_-]{1,64}$; equals the MQTT username where the broker "
        "authenticates"
    }
    messages_commands = {
        f"cmd-{name}": {
            "name": name,
            "title": f"{name} command",
            "contentType": "application/json",
            "payload": _ref(f"commands/{name}.json"),
            "bindings": qos1,
        }
        for name in p.COMMANDS
    }
    messages_events = {
        f"evt-{path.split('/')[1][:-5]}": {
            "name": path.split("/")[1][:-5],
            "contentType": "application/json",
            "payload": _ref(path),
            "bindings": qos0 if path == "events/typing.json" else qos1,
        }
        for path in schemas
        if path.startswith("events/")
    }
    conversation_events = p.CONVERSATION_EVENTS

    def msg_refs(prefix: str, names: Any) -> dict[str, Any]:
        return {n: {"$ref": f"#/components/messages/{prefix}-{n}"} for n in names}

    event_names = [path.split("/")[1][:-5] for path in schemas if path.startswith("events/")]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "chat-bridge wire protocol",
            "version": "1.1",
            "description": "Chat over MQTT. Clients publish JSON commands under their own user's topic; the "
            "bridge stores their effects and then publishes events. `{prefix}` is `chat/v1` "
            "unless configured otherwise. Every command except `disconnect` gets exactly one "
            "answer in the sender's inbox carrying its request_id (a successful `typing` "
            "gets none). See docs/protocol.md.",
        },
        "servers": {
            "broker": {
                "host": "localhost:1883",
                "protocol": "mqtt",
                "protocolVersion": "3.1.1",
                "description": "Each client connection sets this last will, then subscribes to its inbox and "
                "the bridge status, then publishes `connect` with the same session_id.",
                "bindings": {
                    "mqtt": {
                        "cleanSession": True,
                        "lastWill": {
                            "topic": LAYOUT.command("{user}", "disconnect"),
                            "qos": 1,
                            "retain": False,
                            "message": '{"session_id": "<this connection\'s session_id>", "reason": "lost"}',
                        },
                        "keepAlive": 30,
                        "bindingVersion": "0.2.0",
                    }
                },
            },
        },
        "channels": {
            "commands": {
                "address": LAYOUT.command("{user}", "{command}"),
                "description": "Commands from a user's clients (and the broker, for their last will).",
                "parameters": {
                    "user": user_param,
                    "command": {"enum": list(p.COMMANDS), "description": "the command name"},
                },
                "messages": msg_refs("cmd", p.COMMANDS),
            },
            "inbox": {
                "address": LAYOUT.inbox("{user}"),
                "description": "Events for one user: answers (with request_id) and broadcast copies "
                "(request_id null).",
                "parameters": {"user": user_param},
                "messages": msg_refs("evt", event_names),
            },
            "conversationEvents": {
                "address": LAYOUT.conversation("{conversation}"),
                "description": "Every event about a conversation, once, with request_id null; for observers "
                "granted by the operator, not ordinary users.",
                "parameters": {"conversation": {"description": "a conversation id"}},
                "messages": msg_refs("evt", conversation_events),
            },
            "notifications": {
                "address": "chat/v1/notifications/{user}",
                "description": "(1.1) A notification per message for each participant without an active "
                "session (never the sender, never for global); for a push gateway granted by the "
                "operator, not ordinary users.",
                "parameters": {"user": user_param},
                "messages": {"notification": {"$ref": "#/components/messages/notification"}},
            },
            "presence": {
                "address": LAYOUT.presence("{user}"),
                "description": "Retained presence of each user.",
                "parameters": {"user": user_param},
                "messages": {"presence": {"$ref": "#/components/messages/presence"}},
            },
            "bridgeStatus": {
                "address": LAYOUT.status,
                "description": "Retained; a new epoch at every bridge start. The bridge's own last will sets "
                '{"status": "offline"}. On a new epoch, clients send connect again.',
                "messages": {"bridgeStatus": {"$ref": "#/components/messages/bridgeStatus"}},
            },
        },
        "operations": {
            "sendCommand": {"action": "send", "channel": {"$ref": "#/channels/commands"}, "bindings": qos1},
            "receiveInbox": {"action": "receive", "channel": {"$ref": "#/channels/inbox"}, "bindings": qos1},
            "observeConversation": {
                "action": "receive",
                "channel": {"$ref": "#/channels/conversationEvents"},
                "bindings": qos1,
            },
            "receiveTyping": {
                "action": "receive",
                "channel": {"$ref": "#/channels/inbox"},
                "messages": [{"$ref": "#/channels/inbox/messages/typing"}],
                "description": "(1.1) `typing` events reach the inbox at QoS 0 and are never stored.",
                "bindings": qos0,
            },
            "receiveNotifications": {
                "action": "receive",
                "channel": {"$ref": "#/channels/notifications"},
                "bindings": qos1,
            },
            "receivePresence": {
                "action": "receive",
                "channel": {"$ref": "#/channels/presence"},
                "bindings": retained,
            },
            "receiveBridgeStatus": {
                "action": "receive",
                "channel": {"$ref": "#/channels/bridgeStatus"},
                "bindings": retained,
            },
        },
        "components": {
            "messages": {
                **messages_commands,
                **messages_events,
                "notification": {
                    "name": "notification",
                    "contentType": "application/json",
                    "payload": _ref("notification.json"),
                    "bindings": qos1,
                },
                "presence": {
                    "name": "presence",
                    "contentType": "application/json",
                    "payload": _ref("presence.json"),
                    "bindings": retained,
                },
                "bridgeStatus": {
                    "name": "bridge-status",
                    "contentType": "application/json",
                    "payload": _ref("bridge-status.json"),
                    "bindings": retained,
                },
            },
        },
    }


def render() -> dict[str, str]:
    """Every file under schemas/, as text."""
    schemas = json_schemas()
    files = {path: json.dumps(body, indent=2, sort_keys=False) + "\n" for path, body in schemas.items()}
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi(schemas), sort_keys=False, width=100, allow_unicode=True)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if schemas/ differs from the models")
    args = parser.parse_args(argv)
    files = render()
    stale = [
        path
        for path, text in files.items()
        if not (SCHEMAS / path).exists() or (SCHEMAS / path).read_text() != text
    ]
    if args.check:
        for path in stale:
            print(f"stale: schemas/{path}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        (SCHEMAS / path).parent.mkdir(parents=True, exist_ok=True)
        (SCHEMAS / path).write_text(files[path])
    print(f"wrote {len(stale)} of {len(files)} files under schemas/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
