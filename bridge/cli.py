"""`chat-bridge serve`: the command line, where settings are built once and passed down."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from sqlalchemy.engine import Engine

from chat_bridge.chat import add_chat_command

from . import __version__, passwords
from .broker import (
    BrokerStartError,
    Caps,
    InProcessPublisher,
    Security,
    check_ports_free,
    flood_guard_for,
    start_broker,
    ws_url,
)
from .config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_PREFIX,
    DEFAULT_WS_LISTEN,
    BrokerAddress,
    ConfigError,
    Settings,
    check_prefix,
    parse_listen,
)
from .http import HttpServer, HttpServerError, WebConfig
from .inprocess_transport import CommandGate, GateCommands
from .limits import DEFAULT_MAX_EVENT, MIN_MAX_EVENT, CostBudget, RateLimiter
from .metrics import Health, Metrics, Summary, database_probe
from .model import User
from .mqttc_transport import MqttcTransport
from .paho_transport import PahoTransport
from .pipeline import Pipeline
from .protocol import iso_ms
from .runtime import Bridge, InProcessEvents, Publisher
from .service import Service, new_id, wall_clock_ms
from .sql import TRANSIENT_ERRORS, SqlUnitOfWork, init_db, is_transient, make_engine
from .topics import BRIDGE_ACCOUNT, SERVICE_ACCOUNTS, Topics, is_user_id
from .transport import Event, Transport

log = logging.getLogger("chat-bridge")

PROTOCOL_VERSION = "1.1"  # the wire protocol this bridge speaks (docs/protocol.md)

OPTIONS = (
    # flag, environment variable, default, help
    (
        "--broker-url",
        "CHAT_BRIDGE_BROKER_URL",
        None,
        "an external broker, mqtt://[user:password@]host:port; no embedded broker is started",
    ),
    ("--listen", "CHAT_BRIDGE_LISTEN", DEFAULT_LISTEN, "where the embedded broker listens, host:port"),
    (
        "--database-url",
        "CHAT_BRIDGE_DATABASE_URL",
        DEFAULT_DATABASE_URL,
        "a SQLAlchemy URL: sqlite:///path or postgresql+psycopg://...",
    ),
    ("--topic-prefix", "CHAT_BRIDGE_TOPIC_PREFIX", DEFAULT_PREFIX, "the topic prefix"),
    (
        "--session-grace",
        "CHAT_BRIDGE_SESSION_GRACE",
        "30",
        "seconds after a start within which clients must re-announce their sessions",
    ),
    (
        "--password-file",
        "CHAT_BRIDGE_PASSWORD_FILE",
        None,
        "embedded broker only: require the accounts of this Mosquitto password file and enforce "
        "mosquitto/acl's topic rules",
    ),
    (
        "--rate-limit",
        "CHAT_BRIDGE_RATE_LIMIT",
        "50",
        "commands per second each user may send on average; 0: no limit",
    ),
    ("--rate-burst", "CHAT_BRIDGE_RATE_BURST", "200", "how many commands a user may send at once"),
    (
        "--cost-limit",
        "CHAT_BRIDGE_COST_LIMIT",
        "500",
        "events per second a user's commands may cause on average (a message to 100 people is 100, "
        "a page of 100 messages read is 100); "
        "0: no cost budget",
    ),
    ("--cost-burst", "CHAT_BRIDGE_COST_BURST", "500", "how many events a user's commands may cause at once"),
    (
        "--cost-total",
        "CHAT_BRIDGE_COST_TOTAL",
        "4000",
        "events per second of all users together; beyond it, users who spent little come first",
    ),
    (
        "--presence",
        "CHAT_BRIDGE_PRESENCE",
        "broadcast",
        "broadcast: user-connected/-disconnected to every active inbox and active_users in `connected` "
        "(O(N²) for a connect storm); retained: presence only in the retained presence/{user} topics",
    ),
    (
        "--max-event-size",
        "CHAT_BRIDGE_MAX_EVENT_SIZE",
        str(DEFAULT_MAX_EVENT),
        "bytes of the largest event the bridge publishes; keep it below the broker's packet limit "
        f"(Mosquitto's max_packet_size); at least {MIN_MAX_EVENT}",
    ),
    (
        "--ws-listen",
        "CHAT_BRIDGE_WS_LISTEN",
        DEFAULT_WS_LISTEN,
        "embedded broker only: host:port where it also serves MQTT over WebSockets (path /mqtt); off: none",
    ),
    (
        "--ws-origins",
        "CHAT_BRIDGE_WS_ORIGINS",
        "",
        "embedded broker only: comma-separated origins of web pages that may use MQTT over WebSockets "
        "(e.g. https://chat.example.com; *: any); pages of the listener's own host are allowed when "
        "it is localhost or an IP address",
    ),
    (
        "--max-pending",
        "CHAT_BRIDGE_MAX_PENDING",
        "512",
        "embedded broker only: connections (TCP and WebSockets) that have not logged in yet, in all; "
        "a new one beyond closes the oldest",
    ),
    (
        "--max-pending-per-address",
        "CHAT_BRIDGE_MAX_PENDING_PER_ADDRESS",
        "32",
        "embedded broker only: the same from one address (IPv6: its /64); raise it behind a reverse "
        "proxy or a NAT that many clients share",
    ),
    (
        "--http-listen",
        "CHAT_BRIDGE_HTTP_LISTEN",
        DEFAULT_HTTP_LISTEN,
        "host:port of the HTTP server (/healthz, /metrics, a placeholder page at /); off: none",
    ),
    (
        "--http-hosts",
        "CHAT_BRIDGE_HTTP_HOSTS",
        "",
        "comma-separated host names the HTTP server answers for (e.g. chat.example.com, as a reverse "
        "proxy's Host header says; *: any); IP addresses and localhost always, others get 421",
    ),
    (
        "--nats-url",
        "CHAT_BRIDGE_NATS_URL",
        None,
        "scale-out: run as one worker of a group over this NATS cluster (comma-separated nats:// URLs "
        "with the bridge's account); --broker-url then names the cluster's MQTT listeners for the "
        "retained topics, comma-separated (default: the first NATS host, port 1883)",
    ),
    (
        "--nats-auth-seed",
        "CHAT_BRIDGE_NATS_AUTH_SEED",
        None,
        "scale-out with NATS 2.10 or newer: answer the nodes' auth callout, signing with the issuer "
        "seed in this file (chat-bridge nats-auth): logins are checked against --nats-users, and the "
        "client id rule holds",
    ),
    (
        "--nats-users",
        "CHAT_BRIDGE_NATS_USERS",
        None,
        "scale-out: the NATS accounts (users.conf) the auth callout checks logins against",
    ),
    (
        "--partitions",
        "CHAT_BRIDGE_PARTITIONS",
        "64",
        "scale-out: partitions of the command log, as in the NATS configuration's mapping",
    ),
    (
        "--lease",
        "CHAT_BRIDGE_LEASE",
        "10",
        "scale-out: seconds a worker's partitions stay its own without a heartbeat (then others take them)",
    ),
    (
        "--mqtt-client",
        "CHAT_BRIDGE_MQTT_CLIENT",
        "mqttc",
        "with --broker-url: the bridge's own MQTT client, mqttc (its asyncio client, less CPU per "
        "message) or paho (the embedded broker hands commands over in-process)",
    ),
    ("--log-level", "CHAT_BRIDGE_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    (
        "--log-summary",
        "CHAT_BRIDGE_LOG_SUMMARY",
        "60",
        "seconds between the INFO lines that sum up the commands and events handled; 0: none",
    ),
)
# Options whose value is None unless given (on the command line or in the environment), because
# giving them matters: `--ws-listen` with an external broker is ignored with a warning.
UNSET_UNLESS_GIVEN = {"--ws-listen"}
DEFAULT_PASSWORD_FILE = "mosquitto/passwd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-bridge", description="A chat backend for MQTT clients.")
    parser.add_argument(
        "--version", action="version", version=f"chat-bridge {__version__} (protocol {PROTOCOL_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the bridge (with an embedded broker unless --broker-url is given)"
    )
    for flag, env, default, text in OPTIONS:
        shown = "" if default is None else f"; default {default}"
        value = os.environ.get(env, None if flag in UNSET_UNLESS_GIVEN else default)
        serve.add_argument(flag, default=value, help=f"{text} [env {env}{shown}]")
    serve.set_defaults(parser=serve)

    users = sub.add_parser("users", help="manage accounts in a Mosquitto password file")
    users_sub = users.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "create an account or change its password, and register the user"),
        ("remove", "delete an account (the user's messages stay)"),
        ("list", "list the accounts"),
    ):
        cmd = users_sub.add_parser(action, help=text)
        cmd.set_defaults(parser=cmd)
        if action != "list":
            cmd.add_argument("name", help="the user id, which is also the MQTT username")
        cmd.add_argument(
            "--password-file",
            default=os.environ.get("CHAT_BRIDGE_PASSWORD_FILE", DEFAULT_PASSWORD_FILE),
            help=f"[env CHAT_BRIDGE_PASSWORD_FILE; default {DEFAULT_PASSWORD_FILE}]",
        )
        if action != "list":
            cmd.add_argument(
                "--nats-users",
                default=os.environ.get("CHAT_BRIDGE_NATS_USERS"),
                help="scale-out: also keep the account in this NATS users.conf, e.g. nats/users.conf "
                "[env CHAT_BRIDGE_NATS_USERS]",
            )
        if action == "add":
            cmd.add_argument(
                "--password", help="the password (default: asked for, or read from standard input)"
            )
            cmd.add_argument(
                "--database-url",
                default=os.environ.get("CHAT_BRIDGE_DATABASE_URL", DEFAULT_DATABASE_URL),
                help="where to register the user "
                f"[env CHAT_BRIDGE_DATABASE_URL; default {DEFAULT_DATABASE_URL}]",
            )
            cmd.add_argument("--display-name")
    add_chat_command(sub)
    sub.choices["chat"].set_defaults(parser=sub.choices["chat"])
    auth = sub.add_parser(
        "nats-auth",
        help="scale-out (NATS 2.10 or newer): the auth callout's issuer key and the auth.conf that names it",
        description="Makes an issuer key (an account nkey) in SEED_FILE unless the file exists, and "
        "writes the auth.conf that makes the NATS nodes ask the workers about every login "
        "(workers: serve --nats-auth-seed SEED_FILE --nats-users users.conf).",
    )
    auth.add_argument("seed_file", metavar="SEED_FILE", help="the issuer's seed (kept secret, mode 600)")
    auth.add_argument(
        "--conf",
        default="nats/auth.conf",
        help="the auth.conf to write, beside the chat.conf that includes it (default nats/auth.conf)",
    )
    auth.set_defaults(parser=auth)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but an unknown option is reported with the usage of the subcommand it was
    given to, not the top-level one."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def check_nats_auth(settings: Settings) -> None:
    """--nats-auth-seed: a worker's, with a readable seed and accounts file."""
    from . import natsauth

    assert settings.nats_auth_seed is not None
    if not settings.nats_url:
        raise ConfigError("--nats-auth-seed is for a scale-out worker: give --nats-url too")
    if not settings.nats_users:
        raise ConfigError("--nats-auth-seed needs --nats-users: the accounts that logins are checked against")
    try:
        natsauth.Issuer.from_file(Path(settings.nats_auth_seed))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--nats-auth-seed {settings.nats_auth_seed}: {exc}") from None
    if not Path(settings.nats_users).is_file():
        raise ConfigError(f"--nats-users {settings.nats_users}: no such file")


def check_database_url(url: str) -> None:
    """Fails with one line when `url` is not a SQLAlchemy URL of a database kind we can open."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except NoSuchModuleError:  # (an ArgumentError too)
        raise ConfigError(
            f"--database-url: {url.split(':', 1)[0]!r} is no database kind we know; "
            "use sqlite:///path or postgresql+psycopg://..."
        ) from None
    except ArgumentError:
        raise ConfigError(
            "--database-url must be a SQLAlchemy URL (sqlite:///path or postgresql+psycopg://...), "
            f"not {url!r}"
        ) from None


def open_database(url: str, *, background_checkpoints: bool = False) -> Engine:
    """The engine for `url` with the schema migrated, or a ConfigError that says in one line what is
    wrong with the URL or the server."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    check_database_url(url)
    shown = redacted(url)
    database = make_url(url).database if shown.startswith("sqlite") else None
    if database and database != ":memory:" and not Path(database).resolve().parent.is_dir():
        folder = Path(database).resolve().parent
        raise ConfigError(f"--database-url {shown}: the directory {folder} does not exist")
    engine = None
    try:
        engine = make_engine(url, background_checkpoints=background_checkpoints)
        init_db(engine, wall_clock_ms())
        return engine
    except (SQLAlchemyError, OSError, ImportError) as exc:
        cause = getattr(exc, "orig", None) or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if engine is not None:
        engine.dispose()
    raise ConfigError(f"--database-url {shown}: {reason}")


def read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        password = str(args.password)
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < passwords.MIN_LENGTH:
        raise ConfigError(f"a password needs at least {passwords.MIN_LENGTH} characters")
    return password


def write_accounts(path: Path, entries: dict[str, str]) -> None:
    try:
        passwords.write(path, entries)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot rewrite {path} keeping its owner: run this as its owner or as root ({exc})"
        ) from None


def update_nats_users(path: Path, user_id: str, password: str | None) -> None:
    """The same account in the NATS cluster's users.conf (scale-out), bcrypt-hashed; None removes it.
    NATS reads it again on `nats-server --signal reload`."""
    from . import natsconf

    accounts = natsconf.read_users(path)
    if password is None:
        accounts.pop(user_id, None)
    else:
        accounts[user_id] = natsconf.bcrypt_hash(password)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(natsconf.users_conf(accounts))
    tmp.replace(path)
    auth = path.with_name("auth.conf")  # chat.conf includes it beside users.conf
    if not auth.exists():
        auth.write_text(natsconf.auth_conf())
    print(f"{user_id} {'saved in' if password is not None else 'removed from'} {path} (reload NATS)")


def nats_auth_command(args: argparse.Namespace) -> int:
    from . import natsauth, natsconf

    seed = Path(args.seed_file)
    try:
        issuer = natsauth.write_issuer(seed)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{seed}: {exc}") from None
    conf = Path(args.conf)
    conf.write_text(natsconf.auth_conf(issuer))
    print(f"{conf}: logins go to the workers' auth callout (issuer {issuer}); reload NATS, and give")
    print(f"the workers --nats-auth-seed {seed} --nats-users {conf.with_name('users.conf')}")
    return 0


def users_command(args: argparse.Namespace) -> int:
    path = Path(args.password_file)
    try:
        entries = passwords.read(path)
    except passwords.PasswordFileError as exc:
        raise ConfigError(str(exc)) from None
    if args.action == "list":
        for name in entries:
            print(name)
        return 0
    if not is_user_id(args.name):
        raise ConfigError(f"user ids are 1-64 of A-Z a-z 0-9 _ -, not {args.name!r}")
    if args.action == "remove":
        if entries.pop(args.name, None) is None:
            raise ConfigError(f"no account {args.name!r} in {path}")
        write_accounts(path, entries)
        if args.nats_users:
            update_nats_users(Path(args.nats_users), args.name, None)
        print(f"removed {args.name} from {path}")
        return 0
    if args.name not in entries:
        clash = [name for name in entries if name.lower() == args.name.lower()]
        if clash:
            raise ConfigError(f"{args.name!r} differs from the account {clash[0]!r} only in case")
    password = read_password(args)
    entries[args.name] = passwords.hash_password(password)
    write_accounts(path, entries)
    if args.nats_users:
        update_nats_users(Path(args.nats_users), args.name, password)
    if args.name in SERVICE_ACCOUNTS:
        print(f"{args.name} saved in {path} (a service account: not registered as a chat user)")
        return 0
    engine = open_database(args.database_url)
    with SqlUnitOfWork(engine).transaction() as store:
        existing = store.get_user(args.name)
        display_name = args.display_name or (existing.display_name if existing else None)
        store.save_user(User(args.name, display_name, existing.created_ms if existing else wall_clock_ms()))
    engine.dispose()
    print(f"{args.name} saved in {path} and registered in {redacted(args.database_url)}")
    return 0


def _positive(value: str, option: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise ConfigError(f"{option} takes a number of seconds above 0, not {value!r}")
    return number


def _partitions(value: str, option: str = "--partitions") -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{option} takes a whole number of at least 1, not {value!r}")
    return count


def ws_listen_from(args: argparse.Namespace, http_listen: str | None) -> str | None:
    """`--ws-listen` checked: None when off, or ignored (with a warning) for an external broker."""
    given = args.ws_listen
    value = str(given if given is not None else DEFAULT_WS_LISTEN).strip()
    if value.lower() == "off":
        return None
    address = parse_listen(value, "--ws-listen")
    if args.broker_url or args.nats_url:
        if given is not None:
            log.warning(
                "--ws-listen %s is ignored: it is for the embedded broker, and %s names another "
                "(serve MQTT over WebSockets from that broker)",
                value,
                "--nats-url" if args.nats_url else "--broker-url",
            )
        return None
    for option, other in (("--listen", args.listen), ("--http-listen", http_listen)):
        if other is not None and parse_listen(other, option) == address:
            raise ConfigError(f"--ws-listen {value} is also {option}'s address; give them different ports")
    return value


def ws_origins_from(value: str) -> tuple[str, ...]:
    """`--ws-origins` checked: `*`, or origins such as `https://chat.example.com` (no path)."""
    origins = []
    for item in (part.strip().lower().rstrip("/") for part in str(value).split(",")):
        if not item:
            continue
        if item != "*":
            try:
                parts = urlsplit(item)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.path
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                ok = False
            if not ok or parts.query or parts.fragment:
                raise ConfigError(
                    f"--ws-origins takes origins such as https://chat.example.com or *, not {item!r}"
                )
        origins.append(item)
    return tuple(origins)


_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?\.?")


def http_hosts_from(value: str) -> tuple[str, ...]:
    """`--http-hosts` checked: `*`, or host names such as `chat.example.com` (no port, no scheme)."""
    names = []
    for item in (part.strip().lower() for part in str(value).split(",")):
        if not item:
            continue
        if item != "*" and not _HOST_NAME.fullmatch(item):
            raise ConfigError(f"--http-hosts takes host names such as chat.example.com or *, not {item!r}")
        names.append(item.rstrip("."))
    return tuple(names)


def settings_from(args: argparse.Namespace) -> Settings:
    parse_listen(args.listen)
    try:
        grace = float(args.session_grace)
        summary = float(args.log_summary)
        rate, burst = float(args.rate_limit), int(args.rate_burst)
        cost, cost_burst, cost_total = float(args.cost_limit), int(args.cost_burst), float(args.cost_total)
    except ValueError:
        raise ConfigError(
            "--session-grace, --log-summary, --rate-limit, --cost-limit and --cost-total take numbers, "
            "--rate-burst and --cost-burst whole numbers"
        ) from None
    if cost < 0 or cost_burst < 1 or cost_total <= 0:
        raise ConfigError("--cost-limit must be 0 or more, --cost-burst at least 1, --cost-total positive")
    if rate < 0 or burst < 1:
        raise ConfigError("--rate-limit must be 0 or more and --rate-burst at least 1")
    try:
        max_event = int(args.max_event_size)
    except ValueError:
        raise ConfigError(f"--max-event-size takes a number of bytes, not {args.max_event_size!r}") from None
    if max_event < MIN_MAX_EVENT:
        raise ConfigError(f"--max-event-size must be at least {MIN_MAX_EVENT} bytes (a full group's details)")
    if args.presence not in ("broadcast", "retained"):
        raise ConfigError(f"--presence is broadcast or retained, not {args.presence!r}")
    if args.mqtt_client not in ("mqttc", "paho"):
        raise ConfigError(f"--mqtt-client is mqttc or paho, not {args.mqtt_client!r}")
    http_listen = None if str(args.http_listen).strip().lower() == "off" else str(args.http_listen)
    if http_listen is not None:
        parse_listen(http_listen, "--http-listen")
    ws_listen = ws_listen_from(args, http_listen)
    settings = Settings(
        broker_url=args.broker_url or None,
        listen=args.listen,
        database_url=args.database_url,
        topic_prefix=check_prefix(args.topic_prefix),
        session_grace=grace,
        password_file=args.password_file or None,
        rate_limit=rate,
        rate_burst=burst,
        cost_limit=cost,
        cost_burst=cost_burst,
        cost_total=cost_total,
        presence=args.presence,
        max_event=max_event,
        http_listen=http_listen,
        ws_listen=ws_listen,
        ws_origins=ws_origins_from(args.ws_origins),
        http_hosts=http_hosts_from(args.http_hosts),
        log_summary=summary,
        nats_url=args.nats_url or None,
        partitions=_partitions(args.partitions),
        max_pending=_partitions(args.max_pending, "--max-pending"),
        max_pending_per_address=_partitions(args.max_pending_per_address, "--max-pending-per-address"),
        lease=_positive(args.lease, "--lease"),
        mqtt_client=args.mqtt_client,
        nats_auth_seed=args.nats_auth_seed or None,
        nats_users=args.nats_users or None,
    )
    if settings.nats_auth_seed:
        check_nats_auth(settings)
    if settings.nats_url and settings.broker_url:
        from .worker import broker_addresses

        broker_addresses(settings.broker_url)  # a worker's may list the cluster's MQTT listeners
    else:
        settings.broker()  # validates the URL
    check_database_url(settings.database_url)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "INFO")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # no line per WebSocket connection
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "users":
            return users_command(args)
        if args.command == "chat":
            return int(args.run(args))
        if args.command == "nats-auth":
            return nats_auth_command(args)
        settings = settings_from(args)
        return serve(settings)
    except (ConfigError, BrokerStartError, HttpServerError) as exc:
        print(f"chat-bridge: {exc}", file=sys.stderr)
        return 2


def make_service(
    settings: Settings,
    uow: SqlUnitOfWork,
    *,
    epoch: str,
    ids: Callable[[str], str] = new_id,
    metrics: Metrics | None = None,
) -> Service:
    """The service as the settings configure it (one per bridge, or per partition of a worker)."""
    return Service(
        uow,
        epoch=epoch,
        ids=ids,
        max_payload=settings.max_payload,
        transient=TRANSIENT_ERRORS,
        limiter=RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None,
        cost=CostBudget(settings.cost_limit, settings.cost_burst, settings.cost_total)
        if settings.cost_limit > 0
        else None,
        broadcast_presence=settings.presence == "broadcast",
        max_event=settings.max_event,
        metrics=metrics,
    )


def build_bridge(
    settings: Settings,
    broker: BrokerAddress | None = None,
    publisher: Publisher | None = None,
    *,
    commands: Transport | None = None,
    metrics: Metrics | None = None,
    health: Health | None = None,
) -> Bridge:
    """The bridge on an MQTT client to `broker`, or on `commands` (the embedded broker's in-process
    commands); `publisher` hands events to the embedded broker in-process."""
    engine = open_database(settings.database_url, background_checkpoints=True)
    service = make_service(settings, SqlUnitOfWork(engine), epoch=new_id("e"), metrics=metrics)
    if health is not None:
        health.epoch = service.epoch
    topics = Topics(settings.topic_prefix)
    will = Event(topics.status, orjson.dumps({"status": "offline", "epoch": service.epoch}), retain=True)
    address = broker or settings.broker()
    client_id = settings.client_id
    if client_id == "chat-bridge" and settings.topic_prefix != DEFAULT_PREFIX:
        # a bridge of another prefix on the same broker: a client id and a broker session of its own
        client_id += ":" + re.sub(r"[^A-Za-z0-9_.-]", "_", settings.topic_prefix)[:64]
    options = {"client_id": client_id, "keepalive": settings.keepalive, "will": will}
    client = MqttcTransport if settings.mqtt_client == "mqttc" else PahoTransport
    transport: Transport = commands or client(address, topics.commands, **options)  # type: ignore[arg-type]
    if publisher is not None:
        transport = InProcessEvents(transport, publisher)
    pipeline = Pipeline(
        service,
        transport,
        topics,
        session_grace=settings.session_grace,
        publish_window=settings.publish_window,
        is_transient=is_transient,
        probe_interval=settings.probe_interval,
        probe_timeout=settings.probe_timeout,
        health=health,
    )
    return Bridge(pipeline)


async def run_until_signalled(bridge: Bridge, health: Health | None = None) -> None:
    """Runs the bridge until SIGTERM or SIGINT, then stops it gracefully."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        log.info("shutting down")
        bridge.pipeline.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    beats = loop.create_task(heartbeat(health)) if health is not None else None
    try:
        await bridge.run()
    finally:
        if beats is not None:
            beats.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def heartbeat(health: Health, every: float = 1.0) -> None:
    """Tells `health` every second that the event loop still runs its tasks."""
    while True:
        health.loop_beat()
        await asyncio.sleep(every)


def redacted(url: str) -> str:
    """The database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def settle_memory() -> None:
    """Moves everything allocated so far (modules, SQLAlchemy, pydantic) out of the garbage collector's
    sight: its full collections otherwise walked all of it and stalled the bridge for 30-40 ms now and
    then (bench/throughput.py at 500 msg/s: p99 3.3 -> 2.2 ms, max 40 -> 4 ms)."""
    gc.collect()
    gc.freeze()


class Monitoring:
    """The metrics, the health report and the HTTP server that shows them (when `--http-listen` is on)."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics()
        probe = database_probe(settings.database_url)
        self.health = Health(self.metrics, probe, broker=str(settings.broker()))
        self.summary = Summary(
            self.metrics, settings.log_summary, lambda: self.health.probe_database().sessions_active
        )
        self.http: HttpServer | None = None
        if settings.http_listen:
            host, port = parse_listen(settings.http_listen, "--http-listen")
            try:
                # the page at / learns the prefix, and whether the embedded broker wants passwords
                # (an external broker's accounts are its own: unknown here)
                embedded = not (settings.broker_url or settings.nats_url)
                web = WebConfig(
                    prefix=settings.topic_prefix,
                    accounts=bool(settings.password_file) if embedded else None,
                )
                self.http = HttpServer(
                    host,
                    port,
                    self.health,
                    self.metrics,
                    web=web,
                    ws_address=settings.ws_address(),
                    hosts=settings.http_hosts,
                )
            except HttpServerError as exc:
                raise ConfigError(
                    f"--http-listen {settings.http_listen}: {exc}; choose another host:port or `off`"
                ) from None

    def start(self) -> None:
        self.summary.start()
        if self.http:
            self.http.start()

    def stop(self) -> None:
        self.summary.stop()
        if self.http:
            self.http.stop()
        self.health.close()


def serve(settings: Settings) -> int:
    if settings.broker_url and settings.password_file:
        raise ConfigError(
            "--password-file is for the embedded broker; an external broker has its own accounts"
        )
    if settings.nats_url:  # a worker has its own health, metrics and HTTP server
        from .worker import serve_worker

        return asyncio.run(serve_worker(settings, is_transient))
    if not settings.broker_url:
        # every taken address named at once, before anything listens or the database is touched
        taken = [(*parse_listen(settings.listen), "--listen")]
        if (ws := settings.ws_address()) is not None:
            taken.append((*ws, "--ws-listen"))
        if settings.http_listen:
            taken.append((*parse_listen(settings.http_listen, "--http-listen"), "--http-listen"))
        check_ports_free(taken)
    monitoring = Monitoring(settings)  # before anything else: a taken port fails fast
    try:
        if settings.broker_url:
            bridge = build_bridge(settings, metrics=monitoring.metrics, health=monitoring.health)
            settle_memory()
            monitoring.start()
            log.info(
                "using the broker at %s; database %s", settings.broker(), redacted(settings.database_url)
            )
            asyncio.run(run_until_signalled(bridge, monitoring.health))
            return 0
        return asyncio.run(serve_embedded(settings, monitoring))
    finally:
        monitoring.stop()


async def serve_embedded(settings: Settings, monitoring: Monitoring) -> int:
    host, port = parse_listen(settings.listen)
    # The bridge's own account, for this process only, with accounts and without: nobody else can
    # use its client id.
    secret = secrets.token_urlsafe(32)
    security = None
    if settings.password_file:
        security = Security(Path(settings.password_file), secret, settings.topic_prefix)
    address = BrokerAddress(settings.broker().host, port, BRIDGE_ACCOUNT, secret)
    guard = flood_guard_for(settings.rate_limit, settings.rate_burst)
    ws = settings.ws_address()
    # A busy port fails fast, before the database is touched; a bad database fails before the broker
    # starts (nothing to stop then).
    check_ports_free([(host, port, "--listen"), *([(*ws, "--ws-listen")] if ws is not None else [])])
    open_database(settings.database_url).dispose()
    gate = CommandGate(settings.topic_prefix)
    broker = await start_broker(
        host,
        port,
        security,
        prefix=settings.topic_prefix,
        guard=guard,
        bridge_secret=secret,
        ws_listen=ws,
        ws_origins=settings.ws_origins,
        caps=Caps(max_pending=settings.max_pending, max_pending_per_address=settings.max_pending_per_address),
        commands=gate,
    )
    # Commands come in-process from the broker, and the client's PUBACK waits for their commit;
    # events go straight into the broker.
    try:
        bridge = build_bridge(
            settings,
            address,
            InProcessPublisher(broker, asyncio.get_running_loop()),
            commands=GateCommands(gate),
            metrics=monitoring.metrics,
            health=monitoring.health,
        )
    except BaseException:
        await broker.shutdown()
        raise
    settle_memory()
    monitoring.start()
    log.info(
        "embedded broker on %s:%d%s (%s); database %s",
        host,
        port,
        f" and {ws_url(*ws)}" if ws else "",
        f"accounts from {settings.password_file}"
        if security
        else "no accounts: anybody may send commands, only the bridge publishes events",
        redacted(settings.database_url),
    )
    await run_until_signalled(bridge, monitoring.health)  # on the broker's event loop
    await broker.announce_offline(
        Topics(settings.topic_prefix).status, bridge.service.epoch, iso_ms(bridge.service.clock())
    )
    await broker.shutdown()
    return 0
