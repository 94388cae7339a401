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
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
import orjson
import paho.mqtt.client as paho
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from paho.mqtt.enums import CallbackAPIVersion

from . import protocol as p
from .config import BrokerAddress, Settings
from .leases import LEADER, Fenced, Lease, Leases, new_worker_id
from .model import OutboxEntry
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
    """Retained events (presence, status) over an MQTT connection to the cluster's MQTT listener."""

    def __init__(self, address: BrokerAddress, client_id: str, will: tuple[str, bytes] | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(1, 10)
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client.on_publish = self._on_publish
        self.address = address

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.client.connect_async(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()

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
    ) -> None:
        self.settings = settings
        self.partition_count = settings.partitions
        self.worker_id = worker_id or new_worker_id()
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
        self._leader: Lease | None = None
        self._leader_tasks: list[asyncio.Task[None]] = []
        self._status: RetainedPublisher | None = None
        self._stop = asyncio.Event()
        self.epoch = ""
        self.since = ""
        self.ready = asyncio.Event()
        self.applied = 0  # commands applied by this worker (for the logs and benchmarks)
        self._live: list[str] = []
        self._lost: set[int] = set()
        self._lost_leader = False

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
        servers = [s.strip() for s in (self.settings.nats_url or "").split(",") if s.strip()]
        self.nc = await nats.connect(
            servers=servers,
            name=f"chat-bridge:{self.worker_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            allow_reconnect=True,
        )
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
        await self._ensure_streams()
        self._retained = RetainedPublisher(self._mqtt_address(), f"{BRIDGE_ACCOUNT}:{self.worker_id}")
        self._retained.start(loop)
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
        await self.nc.close()
        self._db.shutdown(wait=True)
        self._lease_db.shutdown(wait=True)
        log.info("worker %s left the cluster", self.worker_id)

    def _mqtt_address(self) -> BrokerAddress:
        if self.settings.broker_url:
            return BrokerAddress.from_url(self.settings.broker_url)
        first = urlsplit((self.settings.nats_url or "").split(",")[0].strip())
        return BrokerAddress(first.hostname or "127.0.0.1", 1883, first.username, first.password)

    async def _ensure_streams(self) -> None:
        """Waits for NATS's MQTT stream and gives each partition a consumer, so that NATS keeps the
        commands published before any worker held the partition (the stream keeps a message only
        while some consumer still has to take it)."""
        while True:
            try:
                existing = {c.name for c in await self.js.consumers_info(STREAM)}
                break
            except Exception as exc:  # the stream appears with the first MQTT connection
                log.info("waiting for NATS's MQTT stream (%s)", exc.__class__.__name__)
                await asyncio.sleep(1)
                if self._stop.is_set():
                    return
        for q in range(self.partition_count):
            if not any(name.startswith(f"chat-p{q}-e") for name in existing):
                await self._add_consumer(q, 0, 0)
        if WILLS not in existing:
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
                held = [part.lease for part in self._held.values()]
                if self._leader is not None:
                    held.append(self._leader)
                lost = await self._retrying(partial(self.leases.renew, held), lease=True) if held else set()
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
                await self._take(lease)
        if self._leader is None and live and live[0] == self.worker_id:
            lease = await self._retrying(lambda: self.leases.acquire(LEADER), lease=True)
            if lease is not None:
                await self._lead(lease)
        elif self._leader is not None and live and live[0] != self.worker_id:
            await self._stop_leading(release=True)

    async def _take(self, lease: Lease) -> None:
        q = lease.partition
        part = _Partition(lease, self._service(f"p{q}"))
        self._held[q] = part
        name = await self._add_consumer(q, lease.epoch, lease.applied_seq)
        for info in await self.js.consumers_info(STREAM):
            if info.name.startswith(f"chat-p{q}-e") and info.name != name:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(STREAM, info.name)
        log.info(
            "worker %s took partition %d (epoch %d, from seq %d)",
            self.worker_id,
            q,
            lease.epoch,
            lease.applied_seq + 1,
        )
        part.task = asyncio.create_task(self._consume(part, name), name=f"partition-{q}")

    async def _drop(self, q: int, *, release: bool) -> None:
        part = self._held.pop(q, None)
        if part is None:
            return
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
                    await m.ack()
                    continue
                parsed = self._parse(m.subject, q)
                fresh.append(m)
                if parsed is not None:
                    # published more than BACKLOG seconds ago: the log held it while the workers were
                    # away or behind, and applying the backlog is no flood (never rate-limited)
                    age = now - m.metadata.timestamp.timestamp() if m.metadata.timestamp else 0.0
                    items.append(Inbound(parsed[0], parsed[1], m.data, queued=age > BACKLOG))
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
                log.warning("partition %d: fenced (another worker holds epoch %d); stopping", q, epoch)
                part.stopping = True
                break
            applied = last
            self.applied += len(items)
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
            self._mqtt_address(), f"{BRIDGE_ACCOUNT}:{self.worker_id}-status", will=(status, offline)
        )
        self._status.start(asyncio.get_running_loop())
        online = p.BridgeStatus(status="online", epoch=self.epoch, since=self.since)
        await self._status.publish(status, online.model_dump_json().encode())
        log.info("worker %s leads housekeeping; bridge online (epoch %s)", self.worker_id, self.epoch)
        housekeeping = _Partition(lease, self._service("h"))
        self._leader_tasks = [
            asyncio.create_task(self._route_wills()),
            asyncio.create_task(self._expire_later(housekeeping)),
        ]

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


def _bound_waits(engine: Any, *, idle_ms: int, lock_ms: int) -> None:
    """A worker paused inside a transaction (SIGSTOP, a long GC, a VM migration) would keep its row
    locks, and so stop every worker that writes the same conversation: PostgreSQL ends such a
    session after a third of the lease, and no statement waits more than half a lease for a lock."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _set(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
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


def build(settings: Settings) -> tuple[Callable[[], Any], Any, Callable[..., Service]]:
    """The storage and the service factory of a worker (PostgreSQL in production)."""
    from .cli import make_service
    from .service import wall_clock_ms
    from .sql import SqlUnitOfWork, init_db, make_engine

    engine = make_engine(settings.database_url)
    if engine.dialect.name == "postgresql":
        _bound_waits(engine, idle_ms=int(settings.lease * 1000 / 3), lock_ms=int(settings.lease * 1000 / 2))
    with _one_at_a_time(engine):  # workers starting together must not migrate at once
        init_db(engine, wall_clock_ms())
        Leases(engine, "").ensure(settings.partitions)

    def service(uow: Any, *, epoch: str, ids: Callable[[str], str]) -> Service:
        return make_service(settings, uow, epoch=epoch, ids=ids)

    return (lambda: SqlUnitOfWork(engine)), engine, service


async def serve_worker(settings: Settings, is_transient: Callable[[BaseException], bool]) -> int:
    """`chat-bridge serve --nats-url ...`: one worker until SIGTERM/SIGINT."""
    import signal

    uow_factory, engine, service_factory = build(settings)
    worker = Worker(settings, uow_factory, engine, service_factory=service_factory, is_transient=is_transient)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    return 0
