"""A graceful stop of `chat-bridge serve` (embedded broker) always tells a connected subscriber
`offline`, without a traceback, stop after stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion

ROUNDS = int(os.environ.get("CHAT_BRIDGE_TEST_STOP_ROUNDS", "6"))


def test_every_graceful_stop_delivers_offline(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        one_stop(tmp_path, round_)


def one_stop(tmp_path: Path, round_: int) -> None:
    if True:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--http-listen",
                "off",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log: list[str] = []
        online, offline = threading.Event(), threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.append(line)
                if "bridge online" in line:
                    online.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert online.wait(30), "".join(log)
            statuses: list[str] = []

            def on_message(_c: object, _u: object, m: paho.MQTTMessage) -> None:
                statuses.append(orjson.loads(m.payload)["status"])
                if statuses[-1] == "offline":
                    offline.set()

            subscribed = threading.Event()
            watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher:{round_}")
            watcher.on_message = on_message
            watcher.on_connect = lambda c, *_a: c.subscribe("chat/v1/bridge/status", qos=1)
            watcher.on_subscribe = lambda *_a: subscribed.set()
            watcher.connect("127.0.0.1", port)
            watcher.loop_start()
            assert subscribed.wait(10)
            proc.send_signal(signal.SIGINT if round_ % 2 else signal.SIGTERM)
            assert proc.wait(30) == 0
            reader.join(10)
            assert offline.wait(5), (round_, statuses, "".join(log))
            watcher.loop_stop()
            output = "".join(log)
            assert "Traceback" not in output and "changed size" not in output, output
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
