#!/usr/bin/env python3
"""Waits (up to CHAT_DATABASE_WAIT seconds, default 90) until the PostgreSQL server of
CHAT_BRIDGE_DATABASE_URL accepts a connection: compose engines that ignore `depends_on:
condition: service_healthy` (podman-compose) otherwise start the bridge, or `users add`, while
PostgreSQL is still initialising. Anything else than PostgreSQL: nothing to wait for."""

import os
import sys
import time

import psycopg
from sqlalchemy.engine import make_url

url = make_url(os.environ.get("CHAT_BRIDGE_DATABASE_URL", "sqlite://"))
if url.get_backend_name() != "postgresql":
    sys.exit(0)
deadline = time.monotonic() + float(os.environ.get("CHAT_DATABASE_WAIT", "90"))
while True:
    try:
        psycopg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            connect_timeout=3,
        ).close()
        sys.exit(0)
    except psycopg.OperationalError as exc:
        if time.monotonic() > deadline:
            print(f"chat-bridge: PostgreSQL at {url.host} did not answer: {exc}".strip(), file=sys.stderr)
            sys.exit(2)
        time.sleep(1)
