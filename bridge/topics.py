"""The topic layout, the retain policy and the topic rules (ACL), in one place.

Everything that names a topic uses this module: the bridge (which topic an event goes to, which
command a topic carries), the embedded broker's rules, the schema generator, and the tests that check
`mosquitto/acl` says the same. Five kinds of account:

- ordinary users publish their own commands, by name, never retained (their will is their
  `disconnect` command) and read their own inbox, everyone's presence and the bridge status;
- the bridge's account (`chat-bridge`) reads every user's commands and writes inboxes, conversation
  topics, presence, notifications and the bridge status;
- an optional observer (`chat-observer`) reads conversation topics;
- an optional push gateway (`chat-push`) reads offline notifications.

The client id rule binds MQTT client ids to accounts: a client id is the account's user id, or the
user id, `:` and 1-64 of `[A-Za-z0-9_.-]`. A user id cannot contain `:`, so no account can produce
another account's client ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

Action = Literal["publish", "subscribe", "receive"]
# Where an event goes: the `kind` of a delivery / outbox entry.
Kind = Literal["inbox", "conversation", "presence", "notification", "status"]

DEFAULT_PREFIX: Final = "chat/v1"
BRIDGE_ACCOUNT: Final = "chat-bridge"
OBSERVER_ACCOUNT: Final = "chat-observer"
PUSH_ACCOUNT: Final = "chat-push"
SERVICE_ACCOUNTS: Final = frozenset({BRIDGE_ACCOUNT, OBSERVER_ACCOUNT, PUSH_ACCOUNT})

COMMANDS_1_0: Final = (
    "connect",
    "disconnect",
    "create-conversation",
    "invite",
    "leave",
    "remove-conversation",
    "send-message",
    "reply",
    "get-messages",
    "get-prior-messages",
    "get-conversations",
    "get-participants",
    "get-active-users",
)
COMMANDS_1_1: Final = (
    "mark-read",
    "typing",
    "edit-message",
    "delete-message",
    "react",
    "search-messages",
)
COMMAND_NAMES: Final = COMMANDS_1_0 + COMMANDS_1_1
_KNOWN_COMMANDS: Final = frozenset(COMMAND_NAMES)
# The bridge publishes this to its own command topic to see that its subscription still delivers.
PROBE_COMMAND: Final = "probe"

# Retained kinds: the last presence of each user and the bridge status. Nothing else is retained,
# commands above all (a retained command would be replayed at every bridge subscription).
RETAINED_KINDS: Final = frozenset({"presence", "status"})

_USER_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CLIENT_SUFFIX: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_user_id(value: str) -> bool:
    """Whether `value` is a user id: 1-64 of `[A-Za-z0-9_-]`, nothing before or after (no newline)."""
    return _USER_ID.fullmatch(value) is not None


def is_command(name: str) -> bool:
    """Whether `name` is a command of the protocol (1.0 or 1.1)."""
    return name in _KNOWN_COMMANDS


def client_id_allowed(username: str, client_id: str) -> bool:
    """The client id rule: `username` or `username:<1-64 of [A-Za-z0-9_.-]>`; never empty."""
    if not is_user_id(username):
        return False
    if client_id == username:
        return True
    head, sep, tail = client_id.partition(":")
    return sep == ":" and head == username and _CLIENT_SUFFIX.fullmatch(tail) is not None


def client_id_owner(client_id: str) -> str | None:
    """The user id that a client id belongs to under the client id rule, or None if it follows no
    account (then no account may use it)."""
    head = client_id.partition(":")[0]
    return head if client_id_allowed(head, client_id) else None


def retained(kind: str) -> bool:
    """The retain policy: whether events of this kind are published retained."""
    return kind in RETAINED_KINDS


def matches(topic: str, pattern: str) -> bool:
    """MQTT filter matching: `+` one level, `#` the rest (including none)."""
    t, p = topic.split("/"), pattern.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(t) == len(p)


@dataclass(frozen=True)
class Topics:
    """The topics under one prefix, and who may publish and read them.

    `open_access` is the embedded broker without accounts: anybody may publish commands (for any
    user: there is no identity to bind them to) and read everything, but only the bridge's account
    may publish anything else.
    """

    prefix: str = DEFAULT_PREFIX
    open_access: bool = False

    # -- layout ---------------------------------------------------------------------------------

    @property
    def commands(self) -> str:
        """The filter the bridge subscribes to: every user's commands."""
        return f"{self.prefix}/users/+/commands/+"

    @property
    def status(self) -> str:
        return f"{self.prefix}/bridge/status"

    def command(self, user_id: str, name: str) -> str:
        return f"{self.prefix}/users/{user_id}/commands/{name}"

    def inbox(self, user_id: str) -> str:
        return f"{self.prefix}/users/{user_id}/inbox"

    def conversation(self, conversation_id: str) -> str:
        return f"{self.prefix}/conversations/{conversation_id}/events"

    def presence(self, user_id: str) -> str:
        return f"{self.prefix}/presence/{user_id}"

    def notifications(self, user_id: str) -> str:
        return f"{self.prefix}/notifications/{user_id}"

    def of(self, kind: str, key: str) -> str:
        """The topic of a delivery of this kind (see `Kind`) to `key`."""
        if kind == "inbox":
            return self.inbox(key)
        if kind == "conversation":
            return self.conversation(key)
        if kind == "presence":
            return self.presence(key)
        if kind == "notification":
            return self.notifications(key)
        if kind == "status":
            return self.status
        raise ValueError(f"no topic for deliveries of kind {kind!r}")

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """(user id, command name) of a command topic, or None when it is not one we can answer.

        The name is not checked against the known commands: the bridge answers an unknown one with
        `unknown-command` (where the broker lets it through)."""
        user, name = self._command_parts(topic)
        if user is None or name is None or not is_user_id(user) or not name:
            return None
        return user, name

    def is_command_topic(self, topic: str) -> bool:
        """Whether the topic lies under some user's `commands/` (known command or not)."""
        rest = self._under(topic, "users")
        if rest is None:
            return False
        _user, _, tail = rest.partition("/")
        return tail == "commands" or tail.startswith("commands/")

    def command_user(self, topic: str) -> str | None:
        """The user of a command topic of a known command, else None (the flood guards count per
        user, as the bridge does)."""
        user, name = self._command_parts(topic)
        if user is None or name is None or not is_user_id(user) or not is_command(name):
            return None
        return user

    def _under(self, topic: str, segment: str) -> str | None:
        head = f"{self.prefix}/{segment}/"
        return topic[len(head) :] if topic.startswith(head) else None

    def _command_parts(self, topic: str) -> tuple[str | None, str | None]:
        rest = self._under(topic, "users")
        if rest is None:
            return None, None
        parts = rest.split("/")
        if len(parts) != 3 or parts[1] != "commands":
            return None, None
        return parts[0], parts[2]

    # -- rules ----------------------------------------------------------------------------------

    def readable(self, username: str) -> tuple[str, ...]:
        """The filters of what `username` may receive."""
        common = (f"{self.prefix}/presence/+", self.status)
        if self.open_access and username != BRIDGE_ACCOUNT:
            return ("#",)
        if username == BRIDGE_ACCOUNT:
            return (f"{self.prefix}/users/+/commands/#", *common)
        if username == OBSERVER_ACCOUNT:
            return (f"{self.prefix}/conversations/#", *common)
        if username == PUSH_ACCOUNT:
            return (f"{self.prefix}/notifications/+", *common)
        return (self.inbox(username), *common)

    def writable(self, username: str) -> tuple[str, ...]:
        """The filters of what `username` may publish (retained or not: see `allows`)."""
        if username == BRIDGE_ACCOUNT:
            return (
                f"{self.prefix}/users/+/inbox",
                f"{self.prefix}/conversations/#",
                f"{self.prefix}/presence/+",
                self.status,
                f"{self.prefix}/notifications/+",
                self.command(BRIDGE_ACCOUNT, PROBE_COMMAND),
            )
        if self.open_access:
            return tuple(self.command("+", name) for name in COMMAND_NAMES)
        if username in (OBSERVER_ACCOUNT, PUSH_ACCOUNT):
            return ()
        return tuple(self.command(username, name) for name in COMMAND_NAMES)

    def allows(self, username: str | None, topic: str, action: Action, *, retain: bool = False) -> bool:
        """Whether `username` may publish to / receive from `topic`.

        Any subscription filter is accepted, since what it delivers is checked message by message
        (as Mosquitto does). Publishes to command topics are never retained."""
        if action == "subscribe":
            return True
        if username is None:
            username = ""
        if not self.open_access and not is_user_id(username):
            return False
        if action == "publish" and self.is_command_topic(topic):
            if retain:
                return False
            if username != BRIDGE_ACCOUNT and self._command_parts(topic)[0] in SERVICE_ACCOUNTS:
                return False  # without accounts too, nobody speaks for the service accounts
        patterns = self.writable(username) if action == "publish" else self.readable(username)
        return any(matches(topic, pattern) for pattern in patterns)

    def mosquitto_acl(self) -> list[str]:
        """The rule lines `mosquitto/acl` must hold for this prefix (comments and blank lines aside).

        Mosquitto cannot refuse a retained publish by ACL: its plugin does that."""
        p = self.prefix
        lines = [f"pattern write {self.command('%u', name)}" for name in COMMAND_NAMES]
        lines += [
            f"pattern read {self.inbox('%u')}",
            f"pattern read {p}/presence/+",
            f"pattern read {self.status}",
            f"user {BRIDGE_ACCOUNT}",
            f"topic read {p}/users/+/commands/#",
            f"topic write {p}/users/+/inbox",
            f"topic write {p}/conversations/#",
            f"topic write {p}/presence/+",
            f"topic readwrite {self.status}",
            f"topic write {p}/notifications/+",
            f"topic write {self.command(BRIDGE_ACCOUNT, PROBE_COMMAND)}",
            # Mosquitto's count of the messages it dropped (a full client queue among them); the
            # embedded broker has no $SYS topics.
            "topic read $SYS/broker/publish/messages/dropped",
            f"user {OBSERVER_ACCOUNT}",
            f"topic read {p}/conversations/#",
            f"user {PUSH_ACCOUNT}",
            f"topic read {p}/notifications/+",
        ]
        return lines
