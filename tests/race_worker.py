"""One 'bridge process' for the thread race: reads `reply <message_id>` lines, prints the thread id.

Usage: python race_worker.py DATABASE_URL USER
Prints `ready` once connected, then for each line `<thread id> <conflicts so far>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bridge.model import Conflict
from bridge.service import Inbound, Service
from bridge.sql import TRANSIENT_ERRORS, SqlStore, SqlUnitOfWork, make_engine

conflicts = 0
_add = SqlStore.add_conversation


def counting_add(self: SqlStore, *args: object, **kwargs: object) -> None:
    global conflicts
    try:
        _add(self, *args, **kwargs)  # type: ignore[arg-type]
    except Conflict:
        conflicts += 1
        raise


def main() -> None:
    SqlStore.add_conversation = counting_add  # type: ignore[method-assign]
    url, user = sys.argv[1], sys.argv[2]
    engine = make_engine(url)
    service = Service(SqlUnitOfWork(engine), epoch="race", transient=TRANSIENT_ERRORS)
    service.handle(Inbound(user, "get-active-users", b"{}"))  # warm the connection pool
    print("ready", flush=True)
    for line in sys.stdin:
        _, message_id = line.split()
        out = service.handle(
            Inbound(user, "reply", orjson.dumps({"message_id": message_id, "body": user, "request_id": "x"}))
        )
        answer = next(d.payload for d in out if d.payload.request_id == "x")
        data = answer.model_dump()["data"]
        print(f"{data['message']['conversation_id']} {conflicts}", flush=True)


if __name__ == "__main__":
    main()
