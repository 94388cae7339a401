"""Scale-out: one worker of a group sharing the chat over a NATS cluster and one PostgreSQL database.

The command log is NATS's own MQTT message stream (`$MQTT_msgs`): when an MQTT client publishes a
command at QoS 1, NATS stores it there, under the partition of its user (`bridge/natsconf.py`),
*before* it acknowledges the PUBLISH. A worker consumes the partitions it holds a lease for
(`bridge/leases.py`), each through a durable pull consumer of its own lease epoch, in stream order:

    fetch a batch of a partition -> apply it in one transaction that also records, for its lease
    epoch, the last stream sequence applied (fencing + exactly once) -> acknowledge the messages ->
    publish the events from the outbox -> forget them once NATS has stored them.

Events go out through JetStream into the same stream under `$MQTT.msgs.<topic>`, which NATS
delivers at QoS 1 (to offline persistent sessions too); retained ones (presence, bridge status)
through an MQTT connection of the worker's, since only MQTT publishes set NATS's retained messages.

Partitions are spread evenly over the live workers (partition i to the i mod n-th of them, sorted by
id): a worker that joins takes its share as the others give theirs up; the partitions of one that
dies are taken over when its leases expire. A new owner starts a new consumer at the committed
`applied_seq` + 1 and deletes the old one, so nothing that the old owner fetched but did not commit
is lost or reordered. The housekeeping leader (lease -1) routes last wills (NATS stores them unmapped)
into their user's partition, behind the commands the user published before, ends sessions not
re-announced after a cluster start, and publishes the retained bridge status with the last will
`offline`.

Concurrency: one asyncio loop for NATS, MQTT completions and timers, one database thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import nats
import orjson
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import Counter, Gauge

from chat_bridge._paho import OrderedClient

from . import protocol as p
from .config import BrokerAddress, ConfigError, Settings, parse_listen
from .leases import LEADER, Fenced, Lease, Leases, new_worker_id, session_name
from .metrics import PREFIX, Health, Metrics, Probe, Summary, database_probe
from .model import OutboxEntry
from .natsauth import AuthResponder, Issuer
from .natsconf import BRIDGE_ACCOUNT, Subjects, partition_of
from .protocol import ID_PATTERN
from .service import Batch, Inbound, Service, new_id
from .topics import Topics

T = TypeVar("T")
log = logging.getLogger(__name__)

_USER_ID = re.compile(ID_PATTERN)
STREAM = "$MQTT_msgs"
BACKLOG = 2.0  # seconds
# What NATS's MQTT layer marks a QoS 1 publish with; without it, a message stored from outside MQTT
# reached QoS 1 subscribers on one node, but not those of a cluster's other nodes.
MQTT_QOS1 = {"Nmqtt-Pub": "1"}
WILLS = "chat-wills"


class WorkerMetrics(Metrics):
    """The bridge's metrics (commands, events, database) and a worker's own: its partitions and
    leases, what it applied, its backlog and its NATS connection."""

    def __init__(self, worker_id: str = "") -> None:
        super().__init__()
        r = self.registry
        self.info = Gauge(f"{PREFIX}_worker_info", "This worker's id (value 1).", ["worker"], registry=r)
        if worker_id:
            self.info.labels(worker_id).set(1)
        self.applied = Counter(
            f"{PREFIX}_worker_commands_applied",
            "Commands this worker applied (committed), by partition of the command log.",
            ["partition"],
            registry=r,
        )
        self.partitions_owned = Gauge(
            f"{PREFIX}_worker_partitions_owned", "Partitions whose lease this worker holds.", registry=r
        )
        self.leader = Gauge(
            f"{PREFIX}_worker_leader", "1 while this worker holds the housekeeping lease.", registry=r
        )
        self.takeovers = Counter(
            f"{PREFIX}_worker_lease_takeovers",
            "Partition leases this worker acquired, each with a new epoch; previous: none (free, or "
            "handed over on purpose) or expired (its owner died or stopped renewing).",
            ["previous"],
            registry=r,
        )
        self.leases_lost = Counter(
            f"{PREFIX}_worker_leases_lost",
            "Partition leases this worker found taken by another when renewing them.",
            registry=r,
        )
        self.fenced = Counter(
            f"{PREFIX}_worker_fenced",
            "Batches refused at commit because another worker held the partition at a newer epoch.",
            registry=r,
        )
        self.redeliveries_skipped = Counter(
            f"{PREFIX}_worker_redeliveries_skipped",
            "Commands delivered again at or below their partition's applied sequence (applied before, "
            "acknowledgement lost): acknowledged, not applied again.",
            registry=r,
        )
        self.backlog = Gauge(
            f"{PREFIX}_worker_backlog",
            "Commands in this worker's partitions that NATS still has to deliver to it.",
            registry=r,
        )
        self.nats_connected = Gauge(
            f"{PREFIX}_worker_nats_connected", "1 while the worker is connected to a NATS server.", registry=r
        )
        self.nats_reconnects = Counter(
            f"{PREFIX}_worker_nats_reconnects",
            "Times the worker connected to a NATS server again after losing its connection.",
            registry=r,
        )
        self.logins = Counter(
            f"{PREFIX}_worker_logins",
            "Logins this worker decided as the NATS auth callout (--nats-auth-seed), by outcome: "
            "accepted, or refused for the account, the password, the client id rule, busy or error.",
            ["outcome"],
            registry=r,
        )


class WorkerHealth(Health):
    """What a worker's `/healthz` says. Healthy while it is connected to NATS, to an MQTT listener
    of the cluster (retained presence and status) and to the database, and has renewed its leases
    within a lease period; the body adds its partitions, their lease epochs and its backlog."""

    def __init__(self, metrics: WorkerMetrics, database: Callable[[], Probe], **kw: Any) -> None:
        super().__init__(metrics, database, **kw)
        self.worker_metrics = metrics
        self.worker: Worker | None = None

    def report(self) -> tuple[bool, dict[str, Any]]:
        healthy, body = super().report()
        mqtt = body.pop("broker")
        problems = []
        if not mqtt["connected"]:
            problems.append(f"MQTT: {mqtt['error']}")
        if not body["database"]["reachable"]:
            problems.append(f"database: {body['database']['error']}")
        w = self.worker
        if w is None:
            problems.append("the worker is starting")
            body.update(status="unavailable", mqtt=mqtt, problems=problems)
            return False, body
        retained = getattr(w, "_retained", None)
        if retained is not None:
            mqtt["url"] = str(retained.address)
        nats_url = w.nats_connected_url()
        if nats_url is None:
            problems.append(f"NATS: {w.nats_error or 'not connected'}")
        renewed = w.renewed_ago()
        if renewed is None or renewed > w.settings.lease:
            problems.append("leases not renewed within a lease period" if renewed else "not joined yet")
        owned = w.owned()
        backlog = w.backlog()
        self.worker_metrics.partitions_owned.set(len(owned))
        healthy = not problems
        body.update(
            status="ok" if healthy else "unavailable",
            epoch=w.epoch,
            worker=w.worker_id,
            nats={"url": nats_url, "connected": nats_url is not None, "error": w.nats_error},
            mqtt=mqtt,
            leases={
                "partitions": len(owned),
                "epochs": {str(q): e for q, e in sorted(owned.items())},
                "leader": w.leading(),
                "renewed_seconds_ago": None if renewed is None else round(renewed, 3),
                "lease_seconds": w.settings.lease,
            },
            backlog={"commands": sum(backlog.values()), "outbox": body["outbox_backlog"]},
            problems=problems,
        )
        return healthy, body


def consumer_name(partition: int, epoch: int) -> str:
    return f"chat-p{partition}-e{epoch}"


def share(partition_count: int, live: list[str], me: str) -> set[int]:
    """The partitions this worker should hold: partition i to the (i mod n)-th live worker."""
    if me not in live:
        return set()
    i, n = live.index(me), len(live)
    return {q for q in range(partition_count) if q % n == i}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RetainedPublisher:
    """Retained events (presence, status) over an MQTT connection to the cluster's MQTT listeners:
    to the first of `addresses`, and to the next one whenever the connection fails."""

    def __init__(
        self,
        addresses: list[BrokerAddress],
        client_id: str,
        will: tuple[str, bytes] | None = None,
        on_state: Callable[[bool, str | None], None] | None = None,
    ) -> None:
        self.addresses = addresses
        self._at = 0
        # OrderedClient: publishes made while it reconnects go out after the ones it sends again, and
        # it can be moved to another listener while the old connection is being torn down
        self.client = OrderedClient(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        first = addresses[0]
        if first.username:
            self.client.username_pw_set(first.username, first.password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(1, 10)
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_state = on_state
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail

    @property
    def address(self) -> BrokerAddress:
        return self.addresses[self._at]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.client.connect_async(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()

    def _state(self, up: bool, error: str | None) -> None:
        if self._on_state is not None:
            self._on_state(up, error)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._state(False, f"{self.address.host}:{self.address.port} refused the connection ({reason})")
            self._next()
        else:
            self._state(True, None)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._state(False, f"connection to {self.address.host}:{self.address.port} lost ({reason})")
        self._next()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self._state(False, f"cannot connect to {self.address.host}:{self.address.port}")
        self._next()

    def _next(self) -> None:
        """The next reconnection goes to the next address (the node may be gone for good)."""
        if len(self.addresses) < 2:
            return
        self._at = (self._at + 1) % len(self.addresses)
        # (paho's host and port setters raise here, as the old connection is not closed yet: the
        # publisher stayed on a dead node for good)
        self.client.move_to(self.address.host, self.address.port)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            future = self._futures.pop(mid, None)
        if future is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, future)

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            self._futures[info.mid] = future
        return future

    def stop(self, farewell: tuple[str, bytes] | None = None) -> None:
        if farewell and self.client.is_connected():
            self.client.publish(farewell[0], farewell[1], qos=1, retain=True).wait_for_publish(5)
        self._on_state = None
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _Partition:
    lease: Lease
    service: Service
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    acknowledged: list[str] = field(default_factory=list)  # batches NATS stored, to forget
    in_flight: set[asyncio.Future[list[Any]]] = field(default_factory=set)  # batches being published


class Worker:
    """One worker: runs until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        uow_factory: Callable[[], Any],
        engine: Any,
        *,
        service_factory: Callable[..., Service],
        worker_id: str | None = None,
        tick: float | None = None,
        batch_max: int = 256,
        is_transient: Callable[[BaseException], bool] = lambda exc: False,
        metrics: WorkerMetrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.partition_count = settings.partitions
        self.worker_id = worker_id or new_worker_id()
        self.metrics = metrics or WorkerMetrics(self.worker_id)
        self.health = health
        self.leases = Leases(engine, self.worker_id, int(settings.lease * 1000))
        self.uow_factory = uow_factory
        self.service_factory = service_factory
        self.tick = tick if tick is not None else min(1.0, settings.lease / 4)
        self.batch_max = batch_max
        dbapi = engine.dialect.loaded_dbapi
        self._raw_transient = (dbapi.OperationalError, dbapi.InterfaceError)  # the leases' own connections
        self._transient = is_transient
        self.topics = Topics(settings.topic_prefix)
        self.subjects = Subjects.for_topic_prefix(settings.topic_prefix)
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="worker-db")
        # heartbeats must not wait behind a batch that waits for a lock
        self._lease_db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="worker-leases")
        self._held: dict[int, _Partition] = {}
        self._taking: dict[int, Lease] = {}  # acquired, consumer being created
        self._new_log = False  # the command log is not the one the database counted in (adopt_log)
        self._leader: Lease | None = None
        self._leader_tasks: list[asyncio.Task[None]] = []
        self._status: RetainedPublisher | None = None
        self._auth: AuthResponder | None = None
        self._stop = asyncio.Event()
        self.epoch = ""
        self.since = ""
        self.ready = asyncio.Event()
        self.applied = 0  # commands applied by this worker (for the logs and benchmarks)
        self._live: list[str] = []
        self._lost: set[int] = set()
        self._lost_leader = False
        # read by /healthz from the HTTP server's threads (whole values replaced, never mutated there)
        self.nats_error: str | None = "not connected yet"
        self._renewed: float | None = None
        self._backlog: dict[int, int] = {}

    # --- state, for /healthz -------------------------------------------------------------------

    def nats_connected_url(self) -> str | None:
        nc = getattr(self, "nc", None)
        if nc is None or not nc.is_connected or nc.connected_url is None:
            return None
        url = nc.connected_url
        return f"nats://{url.hostname}:{url.port}"

    def renewed_ago(self) -> float | None:
        """Seconds since this worker last renewed its heartbeat and leases; None before it joined."""
        return None if self._renewed is None else time.monotonic() - self._renewed

    def owned(self) -> dict[int, int]:
        """partition -> lease epoch, of the partitions this worker holds."""
        return {q: part.lease.epoch for q, part in list(self._held.items())}

    def backlog(self) -> dict[int, int]:
        return dict(self._backlog)

    def leading(self) -> bool:
        return self._leader is not None

    # --- helpers -------------------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        return self._transient(exc) or isinstance(exc, self._raw_transient)

    async def _run_db(self, job: Callable[[], T], executor: Any = None) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor or self._db, job)

    async def _retrying(self, job: Callable[[], T], *, lease: bool = False) -> T:
        delay = 0.5
        while True:
            try:
                return await self._run_db(job, self._lease_db if lease else None)
            except Fenced:
                raise
            except Exception as exc:
                if not self.is_transient(exc) or self._stop.is_set():
                    raise
                log.warning("database unavailable (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _service(self, tag: str) -> Service:
        def ids(prefix: str) -> str:
            return f"{tag}.{new_id(prefix)}" if prefix == "b" else new_id(prefix)

        return self.service_factory(self.uow_factory(), epoch=self.epoch, ids=ids)

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._connect_nats()
        if self._stop.is_set():
            return
        if self.settings.nats_auth_seed and self.settings.nats_users:
            # first of all: until a worker answers, no chat client can log in
            self._auth = AuthResponder(
                Issuer.from_file(Path(self.settings.nats_auth_seed)),
                Path(self.settings.nats_users),
                topic_prefix=self.settings.topic_prefix,
                on_decision=lambda outcome: self.metrics.logins.labels(outcome).inc(),
            )
            await self._auth.start(self.nc)
            log.info("worker %s answers the NATS auth callout", self.worker_id)
        self.js = self.nc.jetstream(timeout=10)
        self.epoch, since_ms, fresh = await self._retrying(lambda: self.leases.cluster_epoch(new_id("e")))
        self.since = p.iso_ms(int(since_ms))
        log.info(
            "worker %s joins the cluster (epoch %s%s), %d partitions",
            self.worker_id,
            self.epoch,
            ", new" if fresh else "",
            self.partition_count,
        )
        on_state = None
        if self.health is not None:
            health = self.health

            def on_state(up: bool, error: str | None) -> None:
                health.broker_up() if up else health.broker_down(error or "not connected")

        self._retained = RetainedPublisher(
            self._mqtt_addresses(), f"{BRIDGE_ACCOUNT}:{self.worker_id}", on_state=on_state
        )
        self._retained.start(loop)  # an MQTT connection: NATS creates its MQTT streams for the first one
        await self._ensure_streams()
        self._live = await self._retrying(self.leases.heartbeat, lease=True)
        keeper = asyncio.create_task(self._keep_alive())
        try:
            while not self._stop.is_set():
                try:
                    await self._rebalance()
                except Exception:
                    if self._stop.is_set():
                        break
                    log.exception("rebalancing failed; trying again")
                self.ready.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.tick)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        if getattr(self, "nc", None) is None:
            return
        for part in list(self._held.values()):
            part.stopping = True
        tasks = [t for part in self._held.values() if (t := part.task) is not None]
        tasks += self._leader_tasks
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._run_db(self.leases.leave, self._lease_db)
        if self._status is not None:
            self._status.stop()
        self._retained.stop()
        if self._auth is not None:
            await self._auth.stop()
        await self.nc.close()
        self._db.shutdown(wait=True)
        self._lease_db.shutdown(wait=True)
        log.info("worker %s left the cluster", self.worker_id)

    async def _connect_nats(self) -> None:
        servers = [s.strip() for s in (self.settings.nats_url or "").split(",") if s.strip()]
        metrics = self.metrics

        async def disconnected() -> None:
            self.nats_error = "connection lost; reconnecting"
            metrics.nats_connected.set(0)
            log.warning("worker %s lost its NATS connection; reconnecting", self.worker_id)

        async def reconnected() -> None:
            self.nats_error = None
            metrics.nats_connected.set(1)
            metrics.nats_reconnects.inc()
            log.info("worker %s connected to NATS again (%s)", self.worker_id, self.nats_connected_url())

        async def error(exc: Exception) -> None:
            self.nats_error = f"{exc.__class__.__name__}: {exc}"

        delay = 1.0
        while not self._stop.is_set():
            try:
                self.nc = await nats.connect(
                    servers=servers,
                    **nats_credentials(servers),
                    name=f"chat-bridge:{self.worker_id}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    allow_reconnect=True,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                )
                break
            except Exception as exc:  # no server answers yet: keep trying, and say so
                self.nats_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("no NATS server answers (%s); retrying in %.0fs", self.nats_error, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 10.0)
        else:
            return
        self.nats_error = None
        metrics.nats_connected.set(1)

    def _mqtt_addresses(self) -> list[BrokerAddress]:
        """The cluster's MQTT listeners, from --broker-url (one URL or several, comma-separated);
        without it, port 1883 of the first NATS host."""
        if self.settings.broker_url:
            return broker_addresses(self.settings.broker_url)
        first = urlsplit((self.settings.nats_url or "").split(",")[0].strip())
        return [BrokerAddress(first.hostname or "127.0.0.1", 1883, first.username, first.password)]

    async def _ensure_streams(self) -> None:
        """Waits for NATS's MQTT stream and gives each partition a consumer, so that NATS keeps the
        commands published before any worker held the partition (the stream keeps a message only
        while some consumer still has to take it)."""
        while True:
            try:
                await self._add_missing_consumers()
                return
            except Exception as exc:  # the stream appears with the first MQTT connection
                log.info(
                    "waiting for NATS's MQTT stream (%s); NATS creates it for the first MQTT connection "
                    "(this worker's own, to %s)",
                    exc.__class__.__name__,
                    self._retained.address,
                )
                await asyncio.sleep(1)
                if self._stop.is_set():
                    return

    async def _add_missing_consumers(self) -> None:
        info = await self.js.stream_info(STREAM)
        if not self._new_log:
            created = info.created.isoformat() if info.created else ""
            adopt = partial(self.leases.adopt_log, STREAM, created, int(info.state.last_seq))
            highest = await self._retrying(adopt, lease=True)
            if highest is not None:
                log.warning(
                    "the command log %s (created %s, last sequence %d) is not the one this database "
                    "applied commands from (up to sequence %d): every partition starts again from "
                    "the log's beginning",
                    STREAM,
                    created,
                    info.state.last_seq,
                    highest,
                )
                self._new_log = True
        # A partition no worker ever held (epoch 0) gets its first consumer here (creating it again
        # with the same configuration changes nothing); a held one has its owner's, and a new owner
        # creates the next before it deletes that one. Not found by listing the stream's consumers:
        # a list stops at 256 (every MQTT subscription has a consumer there too) and, with a node
        # down, leaves out those whose leader was on it.
        epochs = await self._retrying(self.leases.epochs, lease=True)
        # in a new log, the consumers of the partitions held before are missing too
        fresh = [q for q, e in sorted(epochs.items()) if e == 0 or self._new_log]
        added = await asyncio.gather(
            *(self._add_consumer(q, epochs[q], 0) for q in fresh), return_exceptions=self._new_log
        )
        for q, result in zip(fresh, added, strict=True):
            if isinstance(result, BaseException):  # (one of the same name exists: its owner's)
                log.info("partition %d: consumer of epoch %d not created (%r)", q, epochs[q], result)
        # A partition taken meanwhile: its owner may have deleted the consumer of epoch 0 just before
        # it was created again here, and that one would keep the partition's messages for ever. Once
        # the owner's own consumer exists, it goes (never before: a partition without a consumer
        # loses what is published to it).
        now = await self._retrying(self.leases.epochs, lease=True)
        for q in fresh:
            if now.get(q, 0) > epochs[q]:
                with contextlib.suppress(Exception):
                    await self.js.consumer_info(STREAM, consumer_name(q, now[q]))
                    await self.js.delete_consumer(STREAM, consumer_name(q, epochs[q]))
        await self.js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=WILLS,
                filter_subject=self.subjects.wills,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
            ),
        )

    async def _add_consumer(self, partition: int, epoch: int, applied: int) -> str:
        name = consumer_name(partition, epoch)
        start: dict[str, Any] = {"deliver_policy": DeliverPolicy.ALL}
        if applied:
            start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": applied + 1}
        await self.js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=name,
                filter_subject=self.subjects.partition_filter(partition),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60,
                max_ack_pending=20_000,
                **start,
            ),
        )
        return name

    # --- leases -------------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Every tick: this worker's heartbeat and the renewal of its leases, whatever else it is
        doing (taking partitions over can take longer than a lease)."""
        while True:
            try:
                self._live = await self._retrying(self.leases.heartbeat, lease=True)
                held = [part.lease for part in self._held.values()] + list(self._taking.values())
                if self._leader is not None:
                    held.append(self._leader)
                lost = await self._retrying(partial(self.leases.renew, held), lease=True) if held else set()
                self._renewed = time.monotonic()
                self.metrics.leases_lost.inc(len(lost))
                for q in lost:
                    if q == LEADER:
                        log.warning("worker %s lost the housekeeping lease", self.worker_id)
                        self._lost_leader = True
                    elif q in self._held:
                        log.warning("worker %s lost partition %d", self.worker_id, q)
                        self._held[q].stopping = True
                        self._lost.add(q)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(self.tick)

    async def _rebalance(self) -> None:
        live = self._live
        if self._lost_leader:
            self._lost_leader = False
            await self._stop_leading()
        for q in list(self._lost):
            self._lost.discard(q)
            await self._drop(q, release=False)
        mine = share(self.partition_count, live, self.worker_id)
        # partitions that are another live worker's share now, handed over together
        await asyncio.gather(*(self._drop(q, release=True) for q in [q for q in self._held if q not in mine]))
        for q in sorted(mine - set(self._held)):
            lease = await self._retrying(lambda q=q: self.leases.acquire(q), lease=True)  # type: ignore[misc]
            if lease is not None:
                self._taking[q] = lease  # renewed from now on
        # consumers created together: one after the other took seconds each with a node down
        taking = list(self._taking.values())
        results = await asyncio.gather(*(self._take(lease) for lease in taking), return_exceptions=True)
        for lease, result in zip(taking, results, strict=True):
            self._taking.pop(lease.partition, None)
            if isinstance(result, BaseException):
                log.warning("partition %d not taken (%r); trying again", lease.partition, result)
        if self._leader is None and live and live[0] == self.worker_id:
            lease = await self._retrying(lambda: self.leases.acquire(LEADER), lease=True)
            if lease is not None:
                await self._lead(lease)
        elif self._leader is not None and live and live[0] != self.worker_id:
            await self._stop_leading(release=True)

    async def _take(self, lease: Lease) -> None:
        q = lease.partition
        part = _Partition(lease, self._service(f"p{q}"))
        try:
            name = await self._add_consumer(q, lease.epoch, lease.applied_seq)
        except BaseException:
            # not held without a consumer (nobody would apply its commands): free for the next round
            with contextlib.suppress(Exception):
                await self._retrying(lambda: self.leases.release(lease), lease=True)
            raise
        self._held[q] = part
        self.metrics.takeovers.labels("expired" if lease.expired_owner else "none").inc()
        self.metrics.partitions_owned.set(len(self._held))
        # The consumers of earlier epochs (the last few: an epoch whose owner died before creating
        # its consumer has none), by name: listing all consumers waited seconds for a dead node.
        for old in range(lease.epoch - 1, max(-1, lease.epoch - 5), -1):
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(STREAM, consumer_name(q, old))
        log.info(
            "worker %s took partition %d (epoch %d, from seq %d%s)",
            self.worker_id,
            q,
            lease.epoch,
            lease.applied_seq + 1,
            f", lease of {lease.expired_owner} expired" if lease.expired_owner else "",
        )
        part.task = asyncio.create_task(self._consume(part, name), name=f"partition-{q}")

    async def _drop(self, q: int, *, release: bool) -> None:
        part = self._held.pop(q, None)
        if part is None:
            return
        self._backlog = {k: v for k, v in self._backlog.items() if k != q}
        self.metrics.partitions_owned.set(len(self._held))
        part.stopping = True
        if part.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(part.task, 10)
        if release:
            # hand over a clean outbox: what is in flight reaches NATS and is forgotten first, so
            # that the next owner has nothing to publish again
            if part.in_flight:
                await asyncio.wait(list(part.in_flight), timeout=10)
            with contextlib.suppress(Exception):
                await self._forget(part)
            await self._retrying(lambda: self.leases.release(part.lease), lease=True)
            log.info("worker %s handed partition %d over", self.worker_id, q)

    # --- a partition ----------------------------------------------------------------------------

    async def _consume(self, part: _Partition, durable: str) -> None:
        q, lease = part.lease.partition, part.lease
        await self._republish(part, lambda b: b.startswith(f"p{q}.b_"))
        sub = await self.js.pull_subscribe_bind(durable, stream=STREAM)
        applied = lease.applied_seq
        while not part.stopping:
            try:
                msgs = await sub.fetch(self.batch_max, timeout=0.5)
            except (TimeoutError, NatsTimeout):
                if self._backlog.get(q):
                    self._backlog = {**self._backlog, q: 0}
                await self._forget(part)
                continue
            except Exception as exc:
                log.warning("partition %d: fetch failed (%r); retrying", q, exc)
                await asyncio.sleep(0.5)
                continue
            items: list[Inbound] = []
            fresh = []
            now = time.time()
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq <= applied:  # applied before a crash, acknowledgement lost
                    self.metrics.redeliveries_skipped.inc()
                    await m.ack()
                    continue
                parsed = self._parse(m.subject, q)
                fresh.append(m)
                if parsed is not None:
                    # published more than BACKLOG seconds ago: the log held it while the workers were
                    # away or behind, and applying the backlog is no flood (never rate-limited)
                    age = now - m.metadata.timestamp.timestamp() if m.metadata.timestamp else 0.0
                    items.append(Inbound(parsed[0], parsed[1], m.data, queued=age > BACKLOG))
            if msgs:
                self._backlog = {**self._backlog, q: msgs[-1].metadata.num_pending or 0}
            if not fresh:
                continue
            first = fresh[0].metadata.sequence.stream
            last = fresh[-1].metadata.sequence.stream
            published, part.acknowledged = part.acknowledged, []
            try:
                fence = partial(self._fence, lease=lease, first=first, last=last)
                batch = await self._retrying(
                    partial(part.service.handle_batch, items, published, within=fence)
                )
            except Fenced:
                owner, epoch, now_applied = await self._retrying(lambda: self.leases.applied(q), lease=True)
                if owner == self.worker_id and epoch == lease.epoch and now_applied >= last:
                    # committed, but the answer to COMMIT was lost: do not apply it again
                    applied = now_applied
                    for m in fresh:
                        await m.ack()
                    await self._republish(part, lambda b: b.startswith(f"p{q}.b_"))
                    continue
                self.metrics.fenced.inc()
                log.warning("partition %d: fenced (another worker holds epoch %d); stopping", q, epoch)
                part.stopping = True
                break
            applied = last
            self.applied += len(items)
            self.metrics.applied.labels(str(q)).inc(len(items))
            for m in fresh:
                await m.ack()
            self._publish(part, batch)

    def _fence(self, store: Any, *, lease: Lease, first: int, last: int) -> None:
        self.leases.record(store.cur, lease, first, last)  # the SQL store's cursor: same transaction

    def _parse(self, subject: str, partition: int) -> tuple[str, str] | None:
        # $MQTT.msgs.cmd.<P>.<user>.<command>
        parts = subject.split(".")
        if len(parts) != 6 or parts[2] != "cmd":
            log.warning("ignoring a message on %s: not a command subject", subject)
            return None
        user, command = parts[4], parts[5]
        if parts[3] != str(partition) or partition_of(user, self.partition_count) != partition:
            # published on a cmd/... topic directly, not through the mapping: not in its user's order
            log.warning("ignoring a command of %s in partition %s, not its own", user, parts[3])
            return None
        if not _USER_ID.fullmatch(user):
            return None
        return user, command

    def _publish(self, part: _Partition, batch: Batch) -> None:
        if not batch.entries:
            if batch.id:
                part.acknowledged.append(batch.id)
            return
        futures = [self._send(entry) for entry in batch.entries]
        done = asyncio.gather(*futures, return_exceptions=True)
        part.in_flight.add(done)

        def finished(f: asyncio.Future[list[Any]]) -> None:
            part.in_flight.discard(f)
            errors = [r for r in f.result() if isinstance(r, BaseException)]
            if errors:
                log.warning(
                    "%d event(s) of batch %s not stored by NATS (%s); they stay in the outbox",
                    len(errors),
                    batch.id,
                    errors[0],
                )
            elif batch.id:
                part.acknowledged.append(batch.id)

        done.add_done_callback(finished)

    def _send(self, entry: OutboxEntry) -> asyncio.Future[Any]:
        topic = self.topics.of(entry.kind, entry.key)
        self.metrics.events_published.labels(entry.kind).inc()
        if entry.retain:
            return self._retained.publish(topic, entry.payload)
        return asyncio.ensure_future(
            self.js.publish(self.subjects.qos1(topic), entry.payload, headers=MQTT_QOS1)
        )

    async def _republish(self, part: _Partition, mine: Callable[[str], bool]) -> None:
        pending = await self._retrying(part.service.pending)
        entries = [e for e in pending if mine(e.batch)]
        if not entries:
            return
        log.info(
            "publishing %d event(s) left in the outbox of %s", len(entries), entries[0].batch.split(".")[0]
        )
        by_batch: dict[str, list[OutboxEntry]] = {}
        for e in entries:
            by_batch.setdefault(e.batch, []).append(e)
        for batch_id, group in by_batch.items():
            self._publish(part, Batch(batch_id, [], group))

    async def _forget(self, part: _Partition) -> None:
        if part.acknowledged:
            done, part.acknowledged = part.acknowledged, []
            await self._retrying(lambda: part.service.forget(done))

    # --- housekeeping leader ------------------------------------------------------------------

    async def _lead(self, lease: Lease) -> None:
        self._leader = lease
        status = self.topics.status
        offline = orjson.dumps({"status": "offline", "epoch": self.epoch})
        self._status = RetainedPublisher(
            self._mqtt_addresses(), f"{BRIDGE_ACCOUNT}:{self.worker_id}-status", will=(status, offline)
        )
        self.metrics.leader.set(1)
        self._status.start(asyncio.get_running_loop())
        housekeeping = _Partition(lease, self._service("h"))
        # not awaited here: until its MQTT connection is up (a listener may be down), the status
        # waits, and the rebalancing must not (it takes the partitions of workers that die)
        self._leader_tasks = [
            asyncio.create_task(self._announce(self._status)),
            asyncio.create_task(self._route_wills()),
            asyncio.create_task(self._expire_later(housekeeping)),
        ]

    async def _announce(self, publisher: RetainedPublisher) -> None:
        online = p.BridgeStatus(status="online", epoch=self.epoch, since=self.since)
        await publisher.publish(self.topics.status, online.model_dump_json().encode())
        log.info("worker %s leads housekeeping; bridge online (epoch %s)", self.worker_id, self.epoch)

    async def _stop_leading(self, release: bool = False) -> None:
        for t in self._leader_tasks:
            t.cancel()
        await asyncio.gather(*self._leader_tasks, return_exceptions=True)
        self._leader_tasks = []
        if self._status is not None:
            self._status.stop()  # a clean disconnect: no will
            self._status = None
        if release and self._leader is not None:
            lease = self._leader
            await self._retrying(lambda: self.leases.release(lease), lease=True)
        self._leader = None
        self.metrics.leader.set(0)

    async def _route_wills(self) -> None:
        """Moves each last will into its user's partition: behind what the user published before."""
        sub = await self.js.pull_subscribe_bind(WILLS, stream=STREAM)
        while True:
            try:
                msgs = await sub.fetch(64, timeout=1)
            except (TimeoutError, NatsTimeout):
                continue
            for m in msgs:
                user = m.subject.split(".")[-3]
                q = partition_of(user, self.partition_count)
                await self.js.publish(self.subjects.routed(q, user, "disconnect"), m.data, headers=MQTT_QOS1)
                await m.ack()

    async def _expire_later(self, housekeeping: _Partition) -> None:
        """Once per cluster epoch, after the grace period: ends sessions nobody re-announced."""
        await asyncio.sleep(self.settings.session_grace)
        if await self._retrying(lambda: self.leases.claim_expiry(self.epoch)):
            batch = await self._retrying(housekeeping.service.expire_sessions)
            self._publish(housekeeping, batch)
        await self._republish(housekeeping, lambda b: b.startswith("h.b_"))
        while True:
            await asyncio.sleep(5)
            await self._forget(housekeeping)


def _bound_waits(engine: Any, *, worker_id: str, idle_ms: int, lock_ms: int) -> None:
    """A worker paused inside a transaction (SIGSTOP, a long GC, a VM migration) would keep its row
    locks, and so stop every worker that writes the same conversation: PostgreSQL ends such a
    session after a third of the lease, and no statement waits more than half a lease for a lock.
    A session paused in the middle of a statement is not idle: each carries the worker's id as its
    `application_name`, and the worker that takes over an expired lease ends them (`Leases`)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _set(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"SET application_name = '{session_name(worker_id)}'")
        cur.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
        cur.execute(f"SET lock_timeout = {lock_ms}")
        dbapi_conn.commit()


@contextlib.contextmanager
def _one_at_a_time(engine: Any) -> Any:
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SET lock_timeout = 0")  # waits for the worker that migrates
        conn.exec_driver_sql("SELECT pg_advisory_lock(72616)")
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(72616)")


def nats_credentials(servers: list[str]) -> dict[str, str]:
    """The user and password of the first `--nats-url` that has them, for every server: nats-py
    takes a URL's credentials for that URL only, and tried the servers it learns from the cluster
    (the other nodes) without any, which they refused."""
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.username:
            return {"user": unquote(parts.username), "password": unquote(parts.password or "")}
    return {}


def broker_addresses(url: str) -> list[BrokerAddress]:
    """`--broker-url` of a worker: one MQTT URL or several, comma-separated (the cluster's nodes); a
    URL without credentials takes those of the first that has them."""
    addresses = [BrokerAddress.from_url(u.strip()) for u in url.split(",") if u.strip()]
    if not addresses:
        raise ConfigError(f"--broker-url names no MQTT listener: {url!r}")
    named = next((a for a in addresses if a.username), None)
    if named is not None:
        addresses = [
            a if a.username else BrokerAddress(a.host, a.port, named.username, named.password)
            for a in addresses
        ]
    return addresses


def build(
    settings: Settings, metrics: Metrics | None = None, worker_id: str = ""
) -> tuple[Callable[[], Any], Any, Callable[..., Service]]:
    """The storage and the service factory of a worker (PostgreSQL in production)."""
    from .cli import make_service
    from .service import wall_clock_ms
    from .sql import SqlUnitOfWork, init_db, make_engine

    engine = make_engine(settings.database_url)
    if engine.dialect.name == "postgresql":
        _bound_waits(
            engine,
            worker_id=worker_id,
            idle_ms=int(settings.lease * 1000 / 3),
            lock_ms=int(settings.lease * 1000 / 2),
        )
    with _one_at_a_time(engine):  # workers starting together must not migrate at once
        init_db(engine, wall_clock_ms())
        Leases(engine, "").ensure(settings.partitions)

    def service(uow: Any, *, epoch: str, ids: Callable[[str], str]) -> Service:
        return make_service(settings, uow, epoch=epoch, ids=ids, metrics=metrics)

    return (lambda: SqlUnitOfWork(engine)), engine, service


async def serve_worker(settings: Settings, is_transient: Callable[[BaseException], bool]) -> int:
    """`chat-bridge serve --nats-url ...`: one worker until SIGTERM/SIGINT, with its `/healthz` and
    `/metrics` on `--http-listen`."""
    import signal

    from .http import HttpServer, HttpServerError

    worker_id = new_worker_id()
    metrics = WorkerMetrics(worker_id)
    health = WorkerHealth(metrics, database_probe(settings.database_url))
    http = None
    if settings.http_listen:  # before anything else: a taken port fails fast
        host, port = parse_listen(settings.http_listen, "--http-listen")
        try:
            http = HttpServer(host, port, health, metrics, hosts=settings.http_hosts)
        except HttpServerError as exc:
            raise ConfigError(
                f"--http-listen {settings.http_listen}: {exc}; choose another host:port or `off`"
            ) from None
    summary = Summary(metrics, settings.log_summary, lambda: health.probe_database().sessions_active)
    try:
        if http:
            http.start()  # 503 "starting" until the worker has joined
        uow_factory, engine, service_factory = build(settings, metrics, worker_id)
        worker = Worker(
            settings,
            uow_factory,
            engine,
            service_factory=service_factory,
            worker_id=worker_id,
            is_transient=is_transient,
            metrics=metrics,
            health=health,
        )
        health.worker = worker
        health.epoch = ""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        summary.start()
        await worker.run()
    finally:
        summary.stop()
        if http:
            http.stop()
        health.close()
    return 0
