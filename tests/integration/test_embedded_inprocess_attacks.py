"""Attacks on the embedded broker's in-process commands (a client's acknowledgement waits for the
bridge's commit), with real clients against `chat-bridge serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion
from test_embedded_ack import Serve

from bridge.pipeline import HOLD_BEFORE_APPLY


def _stop(serve: Serve) -> None:
    serve.proc.send_signal(signal.SIGTERM)
    try:
        serve.proc.wait(30)
    except subprocess.TimeoutExpired:
        serve.kill()


def test_a_qos2_command_acknowledged_survives_a_crash(tmp_path: Path) -> None:
    """A command published at QoS 2 is completed (PUBREC, PUBCOMP) only once committed: a client told
    it was received never sends it again, so a crash before the commit must not have told it so. amqtt
    sent PUBREC on reading the PUBLISH and PUBCOMP once it was routed, before the commit."""
    port, database = free_port(), tmp_path / "chat.sqlite3"
    env = {k: v for k, v in os.environ.items() if k != HOLD_BEFORE_APPLY}
    first = Serve(port, database, {**env, HOLD_BEFORE_APPLY: "60"})
    second: Serve | None = None
    answers: list[dict[str, object]] = []
    got_answer = threading.Condition()
    completed = threading.Event()

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
        command = {"conversation_id": "global", "body": "kept?", "client_msg_id": "c-2", "request_id": "r-2"}
        info = alice.publish("chat/v1/users/alice/commands/send-message", orjson.dumps(command), qos=2)
        threading.Thread(target=lambda: (info.wait_for_publish(120), completed.set()), daemon=True).start()
        assert first.holding.wait(20), first.output()  # the bridge has it, not committed yet
        completed_before_the_crash = completed.wait(2)
        first.kill()

        second = Serve(port, database, env)
        assert second.online.wait(30), second.output()
        assert completed.wait(30), "the command was never completed after the restart"
        alice.publish(
            "chat/v1/users/alice/commands/get-messages",
            orjson.dumps({"conversation_id": "global", "since_seq": 0, "request_id": "history"}),
            qos=1,
        )
        with got_answer:
            assert got_answer.wait_for(lambda: any(a.get("request_id") == "history" for a in answers), 20)
        history = next(a for a in answers if a.get("request_id") == "history")
        bodies = [m["body"] for m in history["data"]["messages"]]  # type: ignore[index]
        assert bodies.count("kept?") == 1, (
            f"completed before the crash: {completed_before_the_crash}; stored after it: {bodies}"
        )
        assert not completed_before_the_crash, "a QoS 2 command was completed before its commit"
    finally:
        alice.loop_stop()
        first.kill()
        if second is not None:
            _stop(second)
