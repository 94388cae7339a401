"""The three brokers the bridge's MQTT client is tested against, each on free ports:
Mosquitto, the embedded amqtt broker, and NATS's MQTT listener (with JetStream)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import EmbeddedBroker, Mosquitto, free_port, mosquitto_available


def nats_binary() -> str | None:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Nats:
    """nats-server with JetStream and an MQTT listener, its data in `workdir`.

    NATS redelivers an unacknowledged QoS 1 message after `ack_wait` (30 s by default), not when
    the session reconnects: the tests shorten it.
    """

    def __init__(self, workdir: Path, extra: str = "", ack_wait: str = "3s") -> None:
        self.port = free_port()
        self.mqtt_port = free_port()
        self.workdir = workdir
        self.conf = workdir / f"nats-{self.port}.conf"
        self.conf.write_text(
            f"host: 127.0.0.1\nport: {self.port}\nserver_name: test-{self.port}\n"
            f'jetstream {{ store_dir: "{workdir / "js"}" }}\n'
            f'mqtt {{ host: 127.0.0.1\n port: {self.mqtt_port}\n ack_wait: "{ack_wait}"\n }}\n{extra}'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"nats-{self.port}.log"

    def start(self) -> Nats:
        binary = nats_binary()
        assert binary is not None
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.mqtt_port)
        except OSError:
            self.stop()
            raise RuntimeError(f"nats-server did not start: {self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def broker(kind: str, workdir: Path, *, mosquitto_extra: tuple[str, ...] = ()) -> Iterator[int]:
    """Starts one broker and yields its MQTT port; skips when its binary is missing."""
    import pytest

    if kind == "mosquitto":
        if not mosquitto_available():
            pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
        m = Mosquitto(workdir, extra=mosquitto_extra).start()
        try:
            yield m.port
        finally:
            m.stop()
    elif kind == "amqtt":
        e = EmbeddedBroker(topic_rules=False).start()  # a plain broker: any topic
        try:
            yield e.port
        finally:
            e.stop()
    else:
        if nats_binary() is None:
            pytest.skip(
                "nats-server is not installed (its MQTT listener is one of the client's test brokers)"
            )
        n = Nats(workdir).start()
        try:
            yield n.mqtt_port
        finally:
            n.stop()
