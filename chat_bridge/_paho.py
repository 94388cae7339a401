"""paho's Client, with QoS 1 and 2 publishes kept in the order they were made across a reconnect.

paho 2.2 sends a publish made while it reconnects (its CONNECT sent, or its CONNACK being handled)
at once, and the earlier publishes it still has to send again only once the CONNACK has been
handled: the broker gets the newer one first. A command stream reordered that way reorders a chat
(two messages sent in a row are stored the other way round). Here a publish made before the
connection is fully back waits in paho's queue behind the earlier ones, and goes out after them.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState

CONNECTED = _ConnectionState.MQTT_CS_CONNECTED


class OrderedClient(paho.Client):
    """A drop-in paho `Client` (MQTT 3.1.1 or 5) whose QoS 1 and 2 publishes reach the broker in
    the order `publish` was called, a reconnect in between or not.

    It relies on three things of paho 2.x's own code: `publish` and `_handle_connack` both hold
    `_out_message_mutex` (an RLock) while they touch the queue, a publish that finds no connection
    stays queued and is sent after the next CONNACK, and `_update_inflight` sends queued messages
    in queue order as the in-flight window allows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reconnecting = False  # a CONNACK is being handled: earlier publishes go out first

    @property
    def _holding(self) -> bool:
        """Whether a publish made now waits behind the ones paho still has to send again."""
        return self._reconnecting or self._state != CONNECTED

    def move_to(self, host: str, port: int) -> None:
        """The broker of the next connection attempt (paho's own setters refuse while a connection
        is being torn down, which is when a client moves on)."""
        self._host, self._port = host, port

    def publish(
        self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> paho.MQTTMessageInfo:
        if qos == 0:
            return super().publish(topic, payload, qos, retain, properties)
        with self._out_message_mutex:
            held = self._sock is not None and self._holding
            info = super().publish(topic, payload, qos, retain, properties)
            if held and info.rc == paho.MQTT_ERR_NO_CONN:
                info.rc = paho.MQTT_ERR_SUCCESS  # queued, and sent once connected (as paho would)
                message = self._out_messages.get(info.mid)
                if message is not None:
                    message.state = paho.mqtt_ms_queued
            return info

    def _send_publish(  # type: ignore[override]
        self,
        mid: int,
        topic: bytes,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: paho.MQTTMessageInfo | None = None,
        properties: Any = None,
    ) -> MQTTErrorCode:
        # `publish` passes its message's info; paho's own resending after a CONNACK passes none
        if qos and info is not None and self._holding:
            return paho.MQTT_ERR_NO_CONN
        return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)

    def _handle_connack(self) -> MQTTErrorCode:
        with self._out_message_mutex:  # no publish from another thread until the earlier ones went
            self._reconnecting = True
            try:
                rc = super()._handle_connack()
            finally:
                self._reconnecting = False
            if self._state == CONNECTED:
                self._send_held()
            return rc

    def _send_held(self) -> None:
        """paho resends from the front of its queue and stops at the first queued message; what
        waits behind it (held here, or queued) goes now as the in-flight window allows, in order,
        and the rest when acknowledgements make room (paho's `_update_inflight`)."""
        window = self._max_inflight_messages
        full = False
        for m in self._out_messages.values():
            if not m.qos or m.state not in (paho.mqtt_ms_publish, paho.mqtt_ms_queued):
                continue
            if full or (window and self._inflight_messages >= window):
                full = True  # nothing newer may overtake it
                m.state = paho.mqtt_ms_queued
                continue
            self._inflight_messages += 1
            m.state = paho.mqtt_ms_wait_for_puback if m.qos == 1 else paho.mqtt_ms_wait_for_pubrec
            with self._in_callback_mutex:  # as paho's own resending: no loop_write from in here
                rc = super()._send_publish(
                    m.mid, m.topic.encode("utf-8"), m.payload, m.qos, m.retain, m.dup, properties=m.properties
                )
            if rc != paho.MQTT_ERR_SUCCESS:
                return  # the connection is gone again: the next reconnect resets and resends all
