"""`chat-bridge serve`: the command line, where settings are built once and passed down."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .broker import ListenError, start_broker
from .config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_LISTEN,
    DEFAULT_PREFIX,
    ConfigError,
    Settings,
    check_prefix,
    parse_listen,
)
from .mqtt import MqttBridge, Topics
from .service import Service, new_id, wall_clock_ms
from .sql import TRANSIENT_ERRORS, SqlUnitOfWork, init_db, is_transient, make_engine

log = logging.getLogger("chat-bridge")

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
    ("--log-level", "CHAT_BRIDGE_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-bridge", description="A chat backend for MQTT clients.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the bridge (with an embedded broker unless --broker-url is given)"
    )
    for flag, env, default, text in OPTIONS:
        serve.add_argument(flag, default=os.environ.get(env, default), help=f"{text} [env {env}]")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    parse_listen(args.listen)
    try:
        grace = float(args.session_grace)
    except ValueError:
        raise ConfigError(f"--session-grace takes seconds, not {args.session_grace!r}") from None
    settings = Settings(
        broker_url=args.broker_url or None,
        listen=args.listen,
        database_url=args.database_url,
        topic_prefix=check_prefix(args.topic_prefix),
        session_grace=grace,
    )
    settings.broker()  # validates the URL
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        settings = settings_from(args)
        return serve(settings)
    except (ConfigError, ListenError) as exc:
        print(f"chat-bridge: {exc}", file=sys.stderr)
        return 2


def build_bridge(settings: Settings) -> MqttBridge:
    engine = make_engine(settings.database_url)
    init_db(engine, wall_clock_ms())
    service = Service(
        SqlUnitOfWork(engine),
        epoch=new_id("e"),
        max_payload=settings.max_payload,
        transient=TRANSIENT_ERRORS,
    )
    return MqttBridge(
        service,
        settings.broker(),
        Topics(settings.topic_prefix),
        client_id=settings.client_id,
        keepalive=settings.keepalive,
        session_grace=settings.session_grace,
        is_transient=is_transient,
    )


def serve(settings: Settings) -> int:
    if settings.broker_url:
        bridge = build_bridge(settings)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        bridge.start()
        log.info("using the broker at %s; database %s", settings.broker(), settings.database_url)
        stop.wait()
        log.info("shutting down")
        bridge.stop()
        return 0
    return asyncio.run(serve_embedded(settings))


async def serve_embedded(settings: Settings) -> int:
    host, port = parse_listen(settings.listen)
    broker = await start_broker(host, port)  # before the database: a busy port fails fast
    bridge = build_bridge(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bridge.start()
    log.info("embedded broker on %s:%d; database %s", host, port, settings.database_url)
    await stop.wait()
    log.info("shutting down")
    await loop.run_in_executor(None, bridge.stop)
    await broker.shutdown()
    return 0
