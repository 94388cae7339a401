"""The paho-mqtt adapter: commands in from the broker, deliveries out to it.

paho's network thread only queues what arrives; one worker thread drains the
queue in batches, applies each batch in one transaction, publishes the events
once it committed and only then acknowledges the commands (`manual_ack`).
With a fixed client id and a persistent session, commands published while the
bridge is down are queued by the broker and applied when it returns.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import core
from . import protocol as p
from .config import BrokerAddress
from .metrics import Health, Metrics
from .model import OutboxEntry, StorageUnavailable
from .service import Batch, Inbound, Service, encode
from .topics import Topics

T = TypeVar("T")

log = logging.getLogger(__name__)


def acknowledged(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged a QoS 1 publish.

    paho keeps a message published while disconnected and sends it after reconnecting, but its
    `is_published()` raises for it forever (rc stays MQTT_ERR_NO_CONN): read the flag regardless.
    """
    if info.rc == paho.MQTT_ERR_NO_CONN:
        info.rc = paho.MQTT_ERR_SUCCESS
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Events go out as soon as they are published: an event must not wait for the ack of the one
    before it (Nagle's algorithm), which paho leaves on."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _report_failure(taken: concurrent.futures.Future[None]) -> None:
    if not taken.cancelled() and taken.exception() is not None:
        log.error(
            "the embedded broker refused events (%s); they stay in the outbox for the next start",
            taken.exception(),
        )


class _Abandoned(Exception):
    """The bridge stops while storage is down; what is in hand stays unacknowledged."""


# Publishes events in-process (the embedded broker): (topic, payload, retain) in order -> a future
# that completes once the broker has taken them all.
Publisher = Callable[[list[tuple[str, bytes, bool]]], "concurrent.futures.Future[None]"]


@dataclass(slots=True)
class _Flight:
    """A batch's publishes awaiting the broker's acknowledgement, oldest first: one check per event."""

    batch_id: str
    pending: deque[Callable[[], bool]]
    complete: bool = False  # every event of the batch handed over


@dataclass(frozen=True, slots=True)
class _Received:
    inbound: Inbound
    mid: int
    qos: int


class MqttBridge:
    """Runs the service against a broker until `stop()`."""

    def __init__(
        self,
        service: Service,
        broker: BrokerAddress,
        topics: Topics,
        *,
        client_id: str = "chat-bridge",
        keepalive: int = 30,
        session_grace: float = 30.0,
        batch_max: int = 256,
        publish_window: int = 10_000,
        publisher: Publisher | None = None,
        is_transient: Callable[[BaseException], bool] = lambda exc: False,
        health: Health | None = None,
    ) -> None:
        self.service = service
        self.metrics: Metrics = service.metrics
        self.health = health
        self.broker = broker
        self.topics = topics
        self.keepalive = keepalive
        self.session_grace = session_grace
        self.batch_max = batch_max
        self.publish_window = publish_window
        self.publisher = publisher
        self.is_transient = is_transient
        self.ready = threading.Event()
        self._queue: queue.Queue[_Received | Callable[[], Batch] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._since = p.iso_ms(service.clock())
        self._grace_timer: threading.Timer | None = None
        self._worker = threading.Thread(target=self._work, name="bridge-worker", daemon=True)
        # Batches published but not yet fully acknowledged by the broker, oldest first, and how many
        # publishes they hold; batches whose every event was acknowledged, to forget at the next commit.
        self._in_flight: deque[_Flight] = deque()
        self._outstanding = 0
        self._acknowledged: list[str] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        # paho keys unacknowledged publishes by their 16-bit message id and silently drops a publish
        # (rc MQTT_ERR_QUEUE_SIZE) once that many wait: `_send` never lets more than the window wait.
        if not 0 < publish_window < 65_535:
            raise ValueError("publish_window must be between 1 and 65534")
        self.client.max_queued_messages_set(publish_window + 16)  # + room for bridge/status
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        offline = orjson.dumps({"status": "offline", "epoch": service.epoch})
        self.client.will_set(topics.status, offline, qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = _no_delay

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        log.info("connecting to %s", self.broker)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Finishes the batch in hand, announces `offline` and disconnects."""
        if self._grace_timer:
            self._grace_timer.cancel()
        self._stopping.set()
        self._queue.put(None)
        self._worker.join(timeout=30)
        if self.client.is_connected():
            status = orjson.dumps(
                {"status": "offline", "epoch": self.service.epoch, "since": p.iso_ms(self.service.clock())}
            )
            info = self.client.publish(self.topics.status, status, qos=1, retain=True)
            info.wait_for_publish(timeout=5)
            self.client.disconnect()
        self.client.loop_stop()

    # --- paho callbacks (network thread: no database work here) --------------

    def _on_connect(
        self, client: paho.Client, _userdata: object, _flags: object, reason: object, _props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker %s refused the connection: %s", self.broker, reason)
            if self.health:
                self.health.broker_down(f"refused: {reason}")
            return
        log.info("connected to %s", self.broker)
        if self.health:
            self.health.broker_up()
        client.subscribe(self.topics.commands, qos=1)

    def _on_subscribe(
        self,
        client: paho.Client,
        _userdata: object,
        _mid: int,
        reason_codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        if any(getattr(rc, "is_failure", False) for rc in reason_codes):
            log.error("the broker refused our subscription to %s: check its ACL", self.topics.commands)
            return
        status = p.BridgeStatus(status="online", epoch=self.service.epoch, since=self._since)
        client.publish(self.topics.status, status.model_dump_json(), qos=1, retain=True)
        if not self.ready.is_set():
            self.ready.set()
            self._grace_timer = threading.Timer(
                self.session_grace, self._queue.put, args=(self.service.expire_sessions,)
            )
            self._grace_timer.daemon = True
            self._grace_timer.start()
            log.info("bridge online (epoch %s)", self.service.epoch)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: object, _flags: object, reason: object, _props: object
    ) -> None:
        if self.health:
            self.health.broker_down(f"disconnected: {reason}")
        if not self._stopping.is_set():
            log.warning("lost the broker (%s); reconnecting", reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        parsed = self.topics.parse_command(msg.topic)
        if msg.retain:
            # A retained command would be replayed at every subscription: never apply one.
            log.warning("ignored a retained message on %r: commands must not be retained", msg.topic)
            self.metrics.dropped.labels("retained-command").inc()
            parsed = None
        elif parsed is None:
            log.warning("ignored a message on %r: not a command topic with a valid user id", msg.topic)
            self.metrics.dropped.labels("bad-topic").inc()
        if parsed is None:
            if msg.qos:
                self.client.ack(msg.mid, msg.qos)
            return
        self._queue.put(_Received(Inbound(parsed[0], parsed[1], bytes(msg.payload)), msg.mid, msg.qos))

    # --- worker ----------------------------------------------------------------

    def _work(self) -> None:
        """The worker loop. An unexpected error is logged and the loop goes on: never a silent dead worker."""
        self._recover()
        while True:
            try:
                if not self._step():
                    return
            except Exception:
                log.exception(
                    "the worker hit an unexpected error; unacknowledged commands will be redelivered"
                )
                self._stopping.wait(1.0)

    def _step(self) -> bool:
        """Handles one batch or job; False when the bridge is stopping."""
        try:
            item = self._queue.get(timeout=1.0)
        except queue.Empty:
            self._forget_published()  # idle: tidy the outbox
            return True
        if item is None:
            return False
        try:
            if callable(item):
                self._send(self._retrying(item))
                return True
            batch, refused = self._split_over_limit(self._gather(item))
            result = None
            if batch:
                inbound = [r.inbound for r in batch]
                result = self._retrying(
                    partial(self.service.handle_batch, inbound, self._published(), admitted=True),
                    partial(self.service.internal_errors, inbound),
                )
        except _Abandoned:
            log.warning("stopped with uncommitted commands in hand; the broker will redeliver them")
            return False
        if result is not None:
            self._send(result)
            self._ack(batch)
        if refused:
            # after the admitted commands: a flooder's refusals never delay the others' answers
            answers = [answer for _, some in refused for answer in some]
            if answers:
                self._send(Batch("", answers, encode(answers, "")))
            self._ack([r for r, _ in refused])
        return True

    def _ack(self, received: list[_Received]) -> None:
        for r in received:
            if r.qos:
                self.client.ack(r.mid, r.qos)

    def _split_over_limit(
        self, batch: list[_Received]
    ) -> tuple[list[_Received], list[tuple[_Received, list[core.Delivery]]]]:
        """The admitted commands, and the rate-limited ones with their `rate-limited` answers (if any):
        those change nothing, so they need no storage and a flood costs no transaction."""
        admitted, refused = [], []
        for r in batch:
            answers = self.service.refusal(r.inbound)
            if answers is None:
                admitted.append(r)
            else:
                refused.append((r, answers))
        return admitted, refused

    def _gather(self, first: _Received) -> list[_Received]:
        """The first command and whatever else already waits, up to batch_max: one transaction."""
        batch = [first]
        while len(batch) < self.batch_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, _Received):
                self._queue.put(nxt)  # internal jobs and the stop signal wait for the next round
                break
            batch.append(nxt)
        return batch

    def _recover(self) -> None:
        """Publishes what an earlier run committed but may not have published (same bytes, same event ids)."""
        try:
            pending = self._retrying(self.service.pending)
        except _Abandoned:
            return
        if pending:
            log.info("publishing %d event(s) left in the outbox by the previous run", len(pending))
        by_batch: dict[str, list[OutboxEntry]] = {}
        for entry in pending:
            by_batch.setdefault(entry.batch, []).append(entry)
        for batch_id, entries in by_batch.items():
            self._send(Batch(batch_id, [], entries))

    def _send(self, batch: Batch) -> None:
        """Publishes the batch's events, waiting while `publish_window` publishes await the broker's ack.

        The wait is the bridge's backpressure: the worker takes no new commands meanwhile, so they wait
        unacknowledged at the broker instead of piling up here. A bridge that is stopping stops waiting;
        whatever paho then refuses is still in the outbox for the next start.
        """
        flight = _Flight(batch.id, deque())
        self._in_flight.append(flight)
        if self.publisher is not None and batch.entries:
            self._wait_for_window()
            events = [(self.topics.of(e.kind, e.key), e.payload, e.retain) for e in batch.entries]
            taken = self.publisher(events)
            taken.add_done_callback(_report_failure)

            def check() -> bool:
                return taken.done() and taken.exception() is None  # a failure stays in the outbox

            flight.pending.extend(check for _ in events)
            self._outstanding += len(events)
        else:
            for e in batch.entries:
                self._wait_for_window()
                topic = self.topics.of(e.kind, e.key)
                info = self.client.publish(topic, e.payload, qos=1, retain=e.retain)
                flight.pending.append(partial(acknowledged, info))
                self._outstanding += 1
        if batch.entries:
            counts: dict[str, int] = {}
            for e in batch.entries:
                counts[e.kind] = counts.get(e.kind, 0) + 1
            for kind, n in counts.items():
                self.metrics.events_published.labels(kind).inc(n)
        flight.complete = True
        # QoS 0, never stored: nothing to wait for or to publish again
        ephemeral = getattr(self.publisher, "ephemeral", None)
        if batch.ephemeral and ephemeral is not None:
            ephemeral([(self.topics.of(e.kind, e.key), e.payload) for e in batch.ephemeral])
        for e in batch.ephemeral if ephemeral is None else ():
            self.client.publish(self.topics.of(e.kind, e.key), e.payload, qos=0, retain=False)

    def _wait_for_window(self) -> None:
        while self._outstanding >= self.publish_window and not self._stopping.is_set():
            self._collect()
            if self._outstanding >= self.publish_window:
                # a short poll, only while the window is full: an on_publish callback signalling
                # every PUBACK cost more than the rest of the acknowledgement's handling
                self._stopping.wait(0.002)

    def _collect(self) -> None:
        """Moves batches whose every event the broker has acknowledged to `_acknowledged`.

        paho sends in order and the broker acknowledges in order, so this walks from the oldest
        publish and stops at the first one still pending: amortised O(1) per event, whatever the backlog.
        """
        while self._in_flight:
            flight = self._in_flight[0]
            while flight.pending and flight.pending[0]():
                flight.pending.popleft()
                self._outstanding -= 1
            if flight.pending or not flight.complete:
                break
            self._in_flight.popleft()
            if flight.batch_id:
                self._acknowledged.append(flight.batch_id)

    def _published(self) -> list[str]:
        """Batches whose every event the broker has acknowledged; they leave the outbox next commit."""
        self._collect()
        done, self._acknowledged = self._acknowledged, []
        return done

    def _forget_published(self) -> None:
        done = self._published()
        if done:
            try:
                self._retrying(partial(self.service.forget, done))
            except _Abandoned:
                return

    def _retrying(self, job: Callable[[], T], fallback: Callable[[], T] | None = None) -> T:
        """Runs the job until it commits; while storage is down nothing is acknowledged.

        A failure that is not an outage is retried a few times, then answered by `fallback`.
        """
        delay, failures, outage_since, reconnected = 0.5, 0, 0.0, False
        while True:
            try:
                result = job()
                if outage_since:
                    log.info("storage is back after %.1fs; carrying on", time.monotonic() - outage_since)
                return result
            except Exception as exc:
                if isinstance(exc, StorageUnavailable) and exc.connection_lost and not reconnected:
                    # A pooled connection the server had closed (a restart, an idle timeout): connections
                    # are not pinged before use, so try a fresh one at once before calling it an outage.
                    reconnected = True
                    self.metrics.database_retries.inc()
                    log.info("the database connection was lost (%s); reconnecting", type(exc).__name__)
                    continue
                self.metrics.database_retries.inc()
                if self.is_transient(exc):
                    outage_since = outage_since or time.monotonic()
                    log.warning(
                        "storage unavailable (%s); retrying in %.1fs, commands stay unacknowledged",
                        type(exc).__name__,
                        delay,
                    )
                else:
                    failures += 1
                    log.exception("a batch failed to commit (attempt %d)", failures)
                    if failures >= 3 and fallback is not None:
                        return fallback()
                if self._stopping.wait(delay):
                    raise _Abandoned from None  # stopping mid-outage: leave the commands unacknowledged
                delay = min(delay * 2, 5.0)
