"""The NATS server configuration of the scale-out mode, written from one place.

A NATS cluster carries the chat for any number of workers: MQTT clients connect to its MQTT
listeners and see the topics of the protocol; the workers talk NATS and JetStream. Everything a
node needs about the chat lives in one account (`CHAT`), in `chat.conf`:

- the partition mapping: every command a user publishes (subject
  `chat.v1.users.<user>.commands.<command>`) becomes `cmd.<P>.<user>.<command>`, P chosen by a hash
  of the user id, so that one partition holds all of a user's commands in publication order;
- the accounts (`users.conf`, included): the bridge's workers may do anything in the account; a chat
  user may publish only its own (mapped) commands and read only its inbox, presence and the bridge
  status; observers read conversation topics; a push gateway reads notifications.

NATS checks publish permissions *after* the mapping (`cmd.*.<user>.*`). Last wills are not
mapped (NATS publishes them under their MQTT topic): the workers route them into the partitions.
The hash is FNV-1a (32 bit) of the user id modulo the number of partitions, as NATS computes
`{{partition(n,1)}}`; `partition_of` is the same function.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PARTITIONS = 64
CHAT_ACCOUNT = "CHAT"  # the NATS account of the chat (every user, the workers)
BRIDGE_ACCOUNT = "chat-bridge"
OBSERVER_ACCOUNT = "chat-observer"
PUSH_GATEWAY_ACCOUNT = "chat-push"


def partition_of(user_id: str, partitions: int) -> int:
    """The partition NATS's `{{partition(partitions,1)}}` puts this user's commands in."""
    h = 0x811C9DC5
    for byte in user_id.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def subject_prefix(topic_prefix: str) -> str:
    """`chat/v1` -> `chat.v1`: NATS's MQTT listener turns `/` into `.`."""
    return topic_prefix.replace("/", ".")


@dataclass(frozen=True, slots=True)
class Subjects:
    """The NATS subjects of the scale-out mode for one topic prefix."""

    prefix: str  # e.g. chat.v1

    @classmethod
    def for_topic_prefix(cls, topic_prefix: str) -> Subjects:
        return cls(subject_prefix(topic_prefix))

    @property
    def commands(self) -> str:
        return f"{self.prefix}.users.*.commands.*"

    @property
    def mapped_commands(self) -> str:
        return "cmd.{{partition(%d,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"

    def partition_filter(self, partition: int) -> str:
        """The subject, in the MQTT message stream, of one partition's commands."""
        return f"$MQTT.msgs.cmd.{partition}.>"

    @property
    def wills(self) -> str:
        """Where last wills land in the MQTT message stream (NATS does not map them)."""
        return f"$MQTT.msgs.{self.prefix}.users.*.commands.disconnect"

    def routed(self, partition: int, user_id: str, command: str) -> str:
        return f"$MQTT.msgs.cmd.{partition}.{user_id}.{command}"

    def qos1(self, topic: str) -> str:
        """Publishing here through JetStream reaches MQTT subscribers at QoS 1, persistent sessions
        that are offline included (a core NATS publish would reach them at QoS 0, live ones only)."""
        return "$MQTT.msgs." + topic.replace("/", ".")

    @staticmethod
    def qos0(topic: str) -> str:
        return topic.replace("/", ".")


def account_conf(
    topic_prefix: str = "chat/v1",
    partitions: int = DEFAULT_PARTITIONS,
    users: str = "users.conf",
    auth: str | None = "auth.conf",
) -> str:
    s = Subjects.for_topic_prefix(topic_prefix)
    mapped = s.mapped_commands % partitions
    logins = f"include {_q(auth)}  # how logins are checked (natsconf.auth_conf)\n" if auth else ""
    return f"""# The chat account, shared by every NATS node of the cluster (written by bridge/natsconf.py).
#
# Each command a user publishes over MQTT (topic {topic_prefix}/users/<user>/commands/<command>) is
# mapped to the subject cmd.<P>.<user>.<command>, P one of {partitions} partitions chosen by a hash of the
# user id: all of a user's commands land in one partition, in the order they were published. The
# number of partitions is fixed for the life of the data: every worker runs with the same
# --partitions ({partitions}).
accounts {{
  CHAT {{
    jetstream: enabled
    mappings = {{
      "{s.commands}": "{mapped}"
    }}
    include {_q(users)}
  }}
}}
{logins}"""


def _q(value: str) -> str:
    return json.dumps(value)


def permissions(user_id: str, topic_prefix: str = "chat/v1") -> tuple[list[str], list[str]]:
    """What an account (not the workers') may publish and subscribe to, as NATS subjects: the
    Mosquitto ACL's topics after NATS's partition mapping. Used by users.conf and by the auth
    callout's JWTs."""
    s = Subjects.for_topic_prefix(topic_prefix)
    if user_id == OBSERVER_ACCOUNT:
        return [], ["$MQTT.sub.>", f"{s.prefix}.conversations.*.events", f"{s.prefix}.bridge.status"]
    if user_id == PUSH_GATEWAY_ACCOUNT:
        return [], ["$MQTT.sub.>", f"{s.prefix}.notifications.*", f"{s.prefix}.bridge.status"]
    sub = [
        "$MQTT.sub.>",
        f"{s.prefix}.users.{user_id}.inbox",
        f"{s.prefix}.presence.*",
        f"{s.prefix}.bridge.status",
    ]
    # Its commands arrive mapped; its last will does not (NATS publishes wills unmapped).
    return [f"cmd.*.{user_id}.*", f"{s.prefix}.users.{user_id}.commands.disconnect"], sub


def user_entry(user_id: str, password_hash: str, topic_prefix: str = "chat/v1") -> str:
    """One account of users.conf, with the permissions of its kind."""
    if user_id == BRIDGE_ACCOUNT:
        # Everything in the account, said explicitly: NATS 2.9.10 crashed on a configuration reload
        # (nil permissions of the source of a retained message, mqttCheckPubRetainedPerms) when the
        # account that published retained presence and status had no permissions block.
        return (
            f"  {{user: {_q(user_id)}, password: {_q(password_hash)}, "
            'permissions: {publish: {allow: [">"]}, subscribe: {allow: [">"]}}}'
        )
    pub, sub = permissions(user_id, topic_prefix)
    pub_allow = ", ".join(_q(x) for x in pub) if pub else ""
    publish = f"publish: {{allow: [{pub_allow}]}}" if pub else 'publish: {deny: [">"]}'
    return (
        f"  {{user: {_q(user_id)}, password: {_q(password_hash)}, permissions: {{\n"
        f"     {publish},\n"
        f"     subscribe: {{allow: [{', '.join(_q(x) for x in sub)}]}}\n"
        f'   }}, allowed_connection_types: ["MQTT", "MQTT_WS"]}}'
    )


def auth_conf(issuer: str | None = None) -> str:
    """auth.conf, which chat.conf includes: with an issuer (an account nkey's public key), NATS
    (2.10 or newer) asks the workers about every login but theirs (natsauth.py); without, it checks
    users.conf itself and the client id rule is not enforced (NATS 2.9 has no callout)."""
    if issuer is None:
        return (
            "# Logins: NATS checks the accounts of users.conf itself. Any account may then use any MQTT\n"
            "# client id (docs/scale-out.md). With NATS 2.10 or newer, `chat-bridge nats-auth SEED_FILE`\n"
            "# writes the auth callout that makes the workers check logins and the client id rule.\n"
        )
    return f"""# Logins (NATS 2.10 or newer): every login but the workers' own is checked by the workers
# (chat-bridge serve --nats-auth-seed), which answer with the account's permissions or refuse it
# (unknown account, wrong password, or a client id that is not the user's own). Written by
# `chat-bridge nats-auth`.
authorization {{
  auth_callout {{
    issuer: {issuer}
    auth_users: [{_q(BRIDGE_ACCOUNT)}]
    account: {CHAT_ACCOUNT}
  }}
}}
"""


def users_conf(accounts: Mapping[str, str], topic_prefix: str = "chat/v1") -> str:
    """users.conf for these accounts (user id -> bcrypt hash)."""
    lines = [
        "# The accounts of the chat (written by `chat-bridge users --nats-users`): do not edit by hand.",
        "users = [",
        *(user_entry(u, h, topic_prefix) for u, h in sorted(accounts.items())),
        "]",
        "",
    ]
    return "\n".join(lines)


def read_users(path: Path) -> dict[str, str]:
    """The accounts of a users.conf written by `users_conf` (user id -> password hash)."""
    return read_users_text(path.read_text()) if path.exists() else {}


def read_users_text(text: str) -> dict[str, str]:
    accounts: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{user: "):
            continue
        user = json.JSONDecoder().raw_decode(line[len("{user: ") :])[0]
        rest = line[line.index("password: ") + len("password: ") :]
        accounts[user] = json.JSONDecoder().raw_decode(rest)[0]
    return accounts


def bcrypt_hash(password: str) -> str:
    import bcrypt  # only the NATS accounts need it

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(11)).decode()


def node_conf(
    name: str,
    *,
    client: str,
    mqtt: str,
    store_dir: str,
    cluster: str | None = None,
    routes: list[str] | None = None,
    cluster_name: str = "chat",
    websocket: str | None = None,
) -> str:
    """One node's configuration; with `cluster`, a member of a cluster whose routes are given; with
    `websocket`, a WebSocket listener, where MQTT clients (browsers) connect at the path /mqtt."""
    lines = [
        f"# NATS node {name} of the chat (written by bridge/natsconf.py).",
        f"server_name: {name}",
        f"listen: {client}",
        f"jetstream {{ store_dir: {_q(store_dir)} }}",
        "# MQTT 3.1.1 for the chat clients; with a cluster the MQTT streams are replicated on 3 nodes.",
        f"mqtt {{ listen: {mqtt}{', stream_replicas: 3' if cluster else ''} }}",
    ]
    if websocket:
        lines += [
            "# MQTT over WebSocket for browsers, at ws://HOST:PORT/mqtt; without TLS for loopback only:",
            "# elsewhere give it a tls { cert_file, key_file } block instead of no_tls.",
            f"websocket {{ listen: {_q(websocket)}, no_tls: true }}",
        ]
    if cluster:
        route_list = ", ".join(_q(r) for r in routes or [])
        lines.append(f"cluster {{ name: {cluster_name}, listen: {cluster}, routes: [{route_list}] }}")
    lines += ['include "chat.conf"', ""]
    return "\n".join(lines)


# The shipped nodes' ports: the usual ones of NATS and MQTT with a 1 in front, so that a local NATS
# (4222) or Mosquitto (1883, 9001) keeps its own.
NATS_PORT, MQTT_PORT, WS_PORT, ROUTE_PORT = 14222, 11883, 19001, 16222


def shipped(directory: Path) -> dict[Path, str]:
    """The files of the project's nats/ directory: the chat account, one node for trying it, and a
    cluster of three nodes on one host (node i: NATS 14222+i, MQTT 11883+i, MQTT over WebSocket
    19001+i, routes 16222+i)."""
    files = {
        directory / "chat.conf": account_conf(),
        directory / "single.conf": node_conf(
            "chat-nats",
            client=f"127.0.0.1:{NATS_PORT}",
            mqtt=f"127.0.0.1:{MQTT_PORT}",
            store_dir="data/single",
            websocket=f"127.0.0.1:{WS_PORT}",
        ),
    }
    routes = [f"nats-route://127.0.0.1:{ROUTE_PORT + i}" for i in range(3)]
    for i in range(3):
        files[directory / f"cluster-n{i + 1}.conf"] = node_conf(
            f"chat-nats-{i + 1}",
            client=f"127.0.0.1:{NATS_PORT + i}",
            mqtt=f"127.0.0.1:{MQTT_PORT + i}",
            store_dir=f"data/n{i + 1}",
            cluster=f"127.0.0.1:{ROUTE_PORT + i}",
            routes=[r for j, r in enumerate(routes) if j != i],
            websocket=f"127.0.0.1:{WS_PORT + i}",
        )
    files.update(compose(directory / "compose"))
    return files


def compose(directory: Path) -> dict[Path, str]:
    """The nodes of docker-compose.yml's `cluster` profile (nats-1..3, each in a container of its
    own, the accounts in the shared volume mounted at /etc/nats/accounts: NATS reads includes relative
    to the including file, absolute paths too)."""
    files = {directory / "chat.conf": account_conf(users="accounts/users.conf", auth=None)}
    for i in range(1, 4):
        files[directory / f"nats-{i}.conf"] = node_conf(
            f"nats-{i}",
            client="0.0.0.0:4222",
            mqtt="0.0.0.0:1883",
            store_dir="/data",
            cluster="0.0.0.0:6222",
            routes=[f"nats-route://nats-{j}:6222" for j in range(1, 4) if j != i],
            websocket="0.0.0.0:9001",
        )
    return files


def main() -> None:
    """`python -m bridge.natsconf DIR`: writes the shipped configuration into DIR."""
    import sys

    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "nats")
    directory.mkdir(parents=True, exist_ok=True)
    for path, content in shipped(directory).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    users = directory / "users.conf"
    if not users.exists():
        users.write_text(users_conf({}))
    auth = directory / "auth.conf"
    if not auth.exists():
        auth.write_text(auth_conf())


if __name__ == "__main__":
    main()
