"""More events than the MQTT client can hold: the bridge waits for the broker instead of losing them.

paho keys unacknowledged publishes by their 16-bit message id and silently refuses a publish once
65,535 wait; a 500-user connect storm (~125,000 events) lost events that way. The window is the
bridge's own bound on waiting publishes; it is set tiny here so that a small storm crosses it.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson
import paho.mqtt.client as paho
from conftest import Mosquitto, running_bridge
from paho.mqtt.enums import CallbackAPIVersion


def test_a_storm_bigger_than_the_publish_window_loses_no_event(
    mosquitto: Mosquitto, tmp_path: object
) -> None:
    users = 40
    # each connect: `connected` to its user, `user-connected` to every active user (itself included)
    expected = users + users * (users + 1) // 2
    seen: list[dict[str, Any]] = []
    all_seen = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        seen.append(orjson.loads(msg.payload))
        if len(seen) >= expected:
            all_seen.set()

    subscribed = threading.Event()
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="storm-watcher")
    watcher.on_message = on_message
    watcher.on_subscribe = lambda *_a: subscribed.set()
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe("chat/v1/users/+/inbox", qos=1)
    assert subscribed.wait(10)
    with running_bridge(mosquitto.port, f"sqlite:///{tmp_path}/c.sqlite3", publish_window=4) as bridge:
        for i in range(users):
            watcher.publish(
                f"chat/v1/users/u{i}/commands/connect", orjson.dumps({"session_id": f"s{i}"}), qos=1
            )
        assert all_seen.wait(60), f"{len(seen)} of {expected} events arrived"
        assert sum(e["type"] == "connected" for e in seen) == users
        assert sum(e["type"] == "user-connected" for e in seen) == expected - users
        assert len({e["event_id"] for e in seen if e["type"] == "connected"}) == users
        assert bridge.pipeline.publish_window == 4  # type: ignore[attr-defined]
    watcher.disconnect()
    watcher.loop_stop()
