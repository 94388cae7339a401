"""Settings, built once by `chat-bridge serve` and passed down."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .limits import DEFAULT_MAX_EVENT

DEFAULT_LISTEN = "127.0.0.1:1883"
DEFAULT_DATABASE_URL = "sqlite:///chat-bridge.sqlite3"
DEFAULT_PREFIX = "chat/v1"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_WS_LISTEN = "127.0.0.1:9001"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ConfigError(f"broker URL must look like mqtt://[user:password@]host:port, not {url!r}")
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"bad port in broker URL {url!r}") from None
        return cls(
            parts.hostname,
            port,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"mqtt://{self.username + '@' if self.username else ''}{self.host}:{self.port}"


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", value.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{option} takes host:port, e.g. 127.0.0.1:1884, not {value!r}")
    return match.group(1) or "127.0.0.1", int(match.group(2))


def check_prefix(prefix: str) -> str:
    if not prefix or any(ch in prefix for ch in "+#") or prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(f"topic prefix must be a plain topic path like chat/v1, not {prefix!r}")
    return prefix


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    topic_prefix: str = DEFAULT_PREFIX
    client_id: str = "chat-bridge"
    max_payload: int = 64 * 1024
    max_event: int = DEFAULT_MAX_EVENT  # bytes of one published event, at most (below the broker's limit)
    session_grace: float = 30.0
    keepalive: int = 30
    password_file: str | None = None
    rate_limit: float = 50.0  # commands per second per user; 0 turns the limit off
    rate_burst: int = 200
    cost_limit: float = 500.0  # events per second a user's commands may cause; 0 turns the budget off
    cost_burst: int = 500
    cost_total: float = 4000.0  # events per second of all users; past it, light users come first
    presence: str = "broadcast"  # or "retained": presence only in the retained presence topics
    nats_url: str | None = None  # scale-out: one worker of a group over a NATS cluster
    partitions: int = 64  # scale-out: partitions of the command log (the NATS mapping's count)
    nats_auth_seed: str | None = None  # scale-out: answer NATS's auth callout, signing with this seed
    nats_users: str | None = None  # scale-out: the accounts (users.conf) the auth callout checks
    lease: float = 10.0  # scale-out: seconds a worker's leases last without a heartbeat
    mqtt_client: str = "mqttc"  # the bridge's MQTT client: "mqttc" (bridge/mqtt_client.py) or "paho"
    publish_window: int = 10_000  # events handed to the MQTT client and not yet acknowledged, at most
    http_listen: str | None = DEFAULT_HTTP_LISTEN  # host:port of /healthz, /metrics and /; None: off
    http_hosts: tuple[str, ...] = ()  # names the HTTP server answers besides IPs, localhost ("*": any)
    ws_listen: str | None = DEFAULT_WS_LISTEN  # embedded broker: host:port of MQTT over WebSockets; None: off
    ws_origins: tuple[str, ...] = ()  # web page origins also allowed to use it ("*": any)
    max_pending: int = 512  # embedded broker: connections not logged in yet, in all
    max_pending_per_address: int = 32  # embedded broker: the same from one address
    log_summary: float = 60.0  # seconds between throughput lines in the log; 0: none
    probe_interval: float = 15.0  # seconds between the bridge's probes of its own command subscription
    probe_timeout: float = 5.0  # a probe not back by then: subscribe again, then reconnect

    def ws_address(self) -> tuple[str, int] | None:
        """Where the embedded broker serves MQTT over WebSockets (path /mqtt); None when it does not
        (`--ws-listen off`, or no embedded broker)."""
        if self.ws_listen is None or self.broker_url or self.nats_url:
            return None
        return parse_listen(self.ws_listen, "--ws-listen")

    def broker(self) -> BrokerAddress:
        if self.broker_url:
            return BrokerAddress.from_url(self.broker_url)
        host, port = parse_listen(self.listen)
        return BrokerAddress("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
