"""With the embedded broker, a client's command is acknowledged (PUBACK) only once the bridge has
committed it: a crash of `chat-bridge serve` (broker and bridge in one process) between the two
loses nothing the client was told was taken. The client's library sends an unacknowledged command
again after reconnecting, and the bridge applies it then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion

from bridge.pipeline import HOLD_BEFORE_APPLY


class Serve:
    """`chat-bridge serve` with its embedded broker, as a subprocess; its output is kept."""

    def __init__(self, port: int, database: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.online, self.holding = threading.Event(), threading.Event()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bridge", "serve", "--listen", f"127.0.0.1:{port}"),
                *("--ws-listen", "off", "--http-listen", "off", "--database-url", f"sqlite:///{database}"),
            ],
            cwd=database.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "bridge online" in line:
                self.online.set()
            if "test hold" in line:
                self.holding.set()

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Crash:
    """What a client saw of a command published while the bridge held it before applying it, then
    SIGKILLed: whether it was told the command was taken before the crash, whether it was told after
    the restart, and the bodies stored after it."""

    told_before: bool
    told_after: bool
    bodies: list[str]


def crash_before_commit(tmp_path: Path, qos: int, client_msg_id: str) -> Crash:
    port, database = free_port(), tmp_path / "chat.sqlite3"
    env = {k: v for k, v in os.environ.items() if k != HOLD_BEFORE_APPLY}
    first = Serve(port, database, {**env, HOLD_BEFORE_APPLY: "60"})
    second: Serve | None = None
    answers: list[dict[str, object]] = []
    got_answer = threading.Condition()
    told = threading.Event()

    def on_message(_c: object, _u: object, m: paho.MQTTMessage) -> None:
        with got_answer:
            answers.append(orjson.loads(m.payload))
            got_answer.notify_all()

    alice = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:phone", clean_session=False)
    alice.reconnect_delay_set(0.1, 0.5)
    alice.on_message = on_message
    alice.on_connect = lambda c, *_a: c.subscribe("chat/v1/users/alice/inbox", qos=1)
    try:
        assert first.online.wait(30), first.output()
        alice.connect("127.0.0.1", port, keepalive=5)
        alice.loop_start()
        command = {
            "conversation_id": "global",
            "body": "kept?",
            "client_msg_id": client_msg_id,
            "request_id": "r",
        }
        info = alice.publish("chat/v1/users/alice/commands/send-message", orjson.dumps(command), qos=qos)
        threading.Thread(target=lambda: (info.wait_for_publish(120), told.set()), daemon=True).start()
        # the bridge has the command and holds it before applying it: no commit yet
        assert first.holding.wait(20), first.output()
        told_before = told.wait(2)
        first.kill()

        second = Serve(port, database, env)
        assert second.online.wait(30), second.output()
        # Whatever the client was told, the command must not be lost: told before the crash it must be
        # stored; not told, paho sends it again after reconnecting, and then it is.
        told_after = told.wait(30)
        alice.publish(
            "chat/v1/users/alice/commands/get-messages",
            orjson.dumps({"conversation_id": "global", "since_seq": 0, "request_id": "history"}),
            qos=1,
        )
        with got_answer:
            assert got_answer.wait_for(lambda: any(a.get("request_id") == "history" for a in answers), 20)
        history = next(a for a in answers if a.get("request_id") == "history")
        bodies = [m["body"] for m in history["data"]["messages"]]  # type: ignore[index]
        return Crash(told_before, told_after, bodies)
    finally:
        alice.loop_stop()
        first.kill()
        if second is not None:
            second.stop()


def test_a_command_acknowledged_by_the_embedded_broker_survives_a_crash(tmp_path: Path) -> None:
    crash = crash_before_commit(tmp_path, qos=1, client_msg_id="c-1")
    assert crash.told_after, "the command was never acknowledged after the restart"
    assert crash.bodies.count("kept?") == 1, (
        f"acknowledged before the crash: {crash.told_before}; stored after it: {crash.bodies}"
    )
    assert not crash.told_before, "the broker acknowledged a command the bridge had not committed"


def test_commands_the_broker_drops_are_still_acknowledged(tmp_path: Path) -> None:
    """A retained command (which the broker drops) gets its PUBACK at once, as from amqtt alone, and so
    does an ordinary command once applied: the client's in-flight window never fills with them."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != HOLD_BEFORE_APPLY}
    serve = Serve(port, tmp_path / "chat.sqlite3", env)
    answers: list[dict[str, object]] = []
    got = threading.Condition()

    def on_message(_c: object, _u: object, m: paho.MQTTMessage) -> None:
        with got:
            answers.append(orjson.loads(m.payload))
            got.notify_all()

    subscribed = threading.Event()
    alice = paho.Client(CallbackAPIVersion.VERSION2, client_id="alice:laptop")
    alice.on_message = on_message
    alice.on_subscribe = lambda *_a: subscribed.set()
    try:
        assert serve.online.wait(30), serve.output()
        alice.connect("127.0.0.1", port)
        alice.loop_start()
        alice.subscribe("chat/v1/users/alice/inbox", qos=1)
        assert subscribed.wait(10)
        topic = "chat/v1/users/alice/commands/send-message"
        retained = orjson.dumps({"conversation_id": "global", "body": "x"})
        dropped = alice.publish(topic, retained, qos=1, retain=True)
        dropped.wait_for_publish(10)
        assert dropped.is_published(), "a dropped command was never acknowledged"
        ordinary = alice.publish(
            topic, orjson.dumps({"conversation_id": "global", "body": "y", "request_id": "r-2"}), qos=1
        )
        ordinary.wait_for_publish(10)
        assert ordinary.is_published()
        with got:
            assert got.wait_for(lambda: any(a.get("request_id") == "r-2" for a in answers), 10), answers
        bodies = [a["data"]["message"]["body"] for a in answers if a["type"] == "message-added"]  # type: ignore[index]
        assert bodies == ["y"], answers  # the retained one was not applied
    finally:
        alice.loop_stop()
        serve.stop()
