"""Who may publish and read which topics: the same rules `mosquitto/acl` gives Mosquitto.

Three kinds of account: ordinary users (publish their own commands, read their
own inbox, everyone's presence and the bridge status), the bridge's account,
and an optional observer account that may read conversation topics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["publish", "subscribe", "receive"]

BRIDGE_ACCOUNT = "chat-bridge"
OBSERVER_ACCOUNT = "chat-observer"


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
class TopicRules:
    prefix: str = "chat/v1"
    bridge_account: str = BRIDGE_ACCOUNT
    observer_account: str = OBSERVER_ACCOUNT

    def readable(self, username: str) -> tuple[str, ...]:
        common = (f"{self.prefix}/presence/+", f"{self.prefix}/bridge/status")
        if username == self.bridge_account:
            return (f"{self.prefix}/users/+/commands/#", *common)
        if username == self.observer_account:
            return (f"{self.prefix}/conversations/#", *common)
        return (f"{self.prefix}/users/{username}/inbox", *common)

    def writable(self, username: str) -> tuple[str, ...]:
        if username == self.bridge_account:
            return (
                f"{self.prefix}/users/+/inbox",
                f"{self.prefix}/conversations/#",
                f"{self.prefix}/presence/+",
                f"{self.prefix}/bridge/status",
            )
        if username == self.observer_account:
            return ()
        return (f"{self.prefix}/users/{username}/commands/#",)

    def allows(self, username: str | None, topic: str, action: Action) -> bool:
        """Publishing and receiving are checked per topic; any subscription filter is accepted,
        since what it delivers is checked message by message (as Mosquitto does)."""
        if not username or any(ch in username for ch in "+#/"):
            return False
        if action == "subscribe":
            return True
        patterns = self.writable(username) if action == "publish" else self.readable(username)
        return any(matches(topic, pattern) for pattern in patterns)
