"""CPU per QoS 1 publish of the bridge's MQTT client (bridge/mqtt_client.py), sent and acknowledged
through a Mosquitto of its own, in batches of 3,000 (as the pipeline hands over a busy batch's
events): `publish()` with a future and a done-callback, against `publish_then()` with a callback.

    python bench/mqtt_publish.py [future then ...]   # the modes to run, in order

Prints process CPU microseconds per publish for each mode.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import start_mosquitto

from bridge.mqtt_client import Client


async def cpu_per_publish(port: int, mode: str, count: int = 30_000, batch: int = 3_000) -> float:
    client = Client("127.0.0.1", port, client_id=f"bench-{mode}", window=10_000, clean_session=True)
    client.start()
    await client.wait_connected(10)
    topics = [f"chat/v1/users/u{i}/inbox" for i in range(20)]
    payload = b"x" * 280
    done = 0

    def then(_error: BaseException | None) -> None:
        nonlocal done
        done += 1

    def future_done(future: asyncio.Future[None]) -> None:
        nonlocal done
        future.exception()
        done += 1

    started = time.process_time()
    for _ in range(count // batch):
        target = done + batch
        for i in range(batch):
            if mode == "then":
                client.publish_then(topics[i % 20], payload, 1, False, then)
            else:
                client.publish(topics[i % 20], payload, 1).add_done_callback(future_done)
        while done < target:
            await asyncio.sleep(0.001)
    used = time.process_time() - started
    await client.stop()
    return used / count * 1e6


def main(modes: Any) -> None:
    broker, port = start_mosquitto(Path(tempfile.mkdtemp(prefix="chat-publish-")))
    try:
        for mode in modes:
            if mode not in ("future", "then"):
                raise SystemExit(f"unknown mode {mode!r}: future or then")
            print(f"{mode:6} {asyncio.run(cpu_per_publish(port, mode)):.1f} us per publish", flush=True)
    finally:
        broker.terminate()


if __name__ == "__main__":
    main(sys.argv[1:] or ["future", "then"])
