"""Partition leases with fencing, in the database the workers share.

Each partition of the command log has one row: who owns it (`owner`), the lease's `epoch` (raised by
every takeover), when it expires, and the stream sequence of the last command applied for it. A
worker commits a batch of a partition only inside a transaction that also moves that row's
`applied_seq` forward *for its own epoch* (`record`): once another worker has taken the partition
over (a higher epoch), the paused or cut-off one can no longer commit anything for it, and a batch
applied once is never applied again (its sequence numbers are at or below `applied_seq`).

Times come from the database's clock, so the workers' clocks may disagree. Row -1 is the lease of
the housekeeping leader (session expiry after a cluster start, routing of last wills, the retained
bridge status). The `cluster_state` row holds the cluster's epoch: a new one only when no worker
was alive when one started, so clients re-announce after a cluster restart, not a worker's.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

LEADER = -1

metadata = MetaData()
partition_leases = Table(
    "partition_leases",
    metadata,
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(128), nullable=True),
    Column("epoch", BigInteger, nullable=False, default=0),
    Column("expires_ms", BigInteger, nullable=False, default=0),
    Column("applied_seq", BigInteger, nullable=False, default=0),
)
workers = Table(
    "workers",
    metadata,
    Column("worker_id", String(128), primary_key=True),
    Column("expires_ms", BigInteger, nullable=False),
)
command_logs = Table(  # the command log the partitions' applied_seq count in
    "command_logs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created", String(64), nullable=False),
)
cluster_state = Table(
    "cluster_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("epoch", String(64), nullable=False),
    Column("since_ms", BigInteger, nullable=False),
    Column("expired_epoch", String(64), nullable=True),  # the epoch whose stale sessions were ended
)


class Fenced(Exception):
    """This worker's lease of the partition is gone: another worker owns it now."""


@dataclass(frozen=True, slots=True)
class Lease:
    partition: int
    epoch: int
    applied_seq: int
    expired_owner: str | None = None  # taken over from this worker, whose lease had expired


def _now(dialect: str) -> str:
    if dialect == "postgresql":
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    return "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


class Leases:
    """The lease operations of one worker, each in a short transaction of its own, except `record`,
    which runs inside the transaction of the batch it fences."""

    def __init__(self, engine: Engine, worker_id: str, ttl_ms: int = 10_000) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.ttl_ms = ttl_ms
        self.dialect = engine.dialect.name
        self.now = _now(self.dialect)
        self.ph = "%s" if engine.dialect.paramstyle in ("format", "pyformat") else "?"

    def _sql(self, sql: str) -> str:
        return sql.replace("NOW_MS", self.now).replace(":?", self.ph)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            if self.dialect == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def ensure(self, partitions: int) -> None:
        """Creates the tables and the lease rows of every partition and of the leader, if missing."""
        metadata.create_all(self.engine)
        with self._tx() as cur:
            cur.execute("SELECT partition FROM partition_leases")
            have = {row[0] for row in cur.fetchall()}
            missing = [(p,) for p in [LEADER, *range(partitions)] if p not in have]
            if missing:
                cur.executemany(
                    self._sql(
                        "INSERT INTO partition_leases (partition, epoch, expires_ms, applied_seq) "
                        "VALUES (:?, 0, 0, 0)"
                    ),
                    missing,
                )

    # --- workers ------------------------------------------------------------------------------

    def heartbeat(self) -> list[str]:
        """Marks this worker alive for one more lease period; returns the live workers, sorted."""
        with self._tx() as cur:
            cur.execute(
                self._sql("UPDATE workers SET expires_ms = NOW_MS + :? WHERE worker_id = :?"),
                (self.ttl_ms, self.worker_id),
            )
            if cur.rowcount == 0:
                cur.execute(
                    self._sql("INSERT INTO workers (worker_id, expires_ms) VALUES (:?, NOW_MS + :?)"),
                    (self.worker_id, self.ttl_ms),
                )
            cur.execute(self._sql("DELETE FROM workers WHERE expires_ms < NOW_MS - :?"), (10 * self.ttl_ms,))
            cur.execute(
                self._sql("SELECT worker_id FROM workers WHERE expires_ms > NOW_MS ORDER BY worker_id")
            )
            return [row[0] for row in cur.fetchall()]

    def _beat(self, cur: Any) -> None:
        cur.execute(
            self._sql("UPDATE workers SET expires_ms = NOW_MS + :? WHERE worker_id = :?"),
            (self.ttl_ms, self.worker_id),
        )
        if cur.rowcount == 0:
            cur.execute(
                self._sql("INSERT INTO workers (worker_id, expires_ms) VALUES (:?, NOW_MS + :?)"),
                (self.worker_id, self.ttl_ms),
            )

    def leave(self) -> None:
        """Gives up every lease of this worker and its place among the live workers (a clean stop)."""
        with self._tx() as cur:
            cur.execute(
                self._sql("UPDATE partition_leases SET owner = NULL, expires_ms = 0 WHERE owner = :?"),
                (self.worker_id,),
            )
            cur.execute(self._sql("DELETE FROM workers WHERE worker_id = :?"), (self.worker_id,))

    def cluster_epoch(self, new_epoch: str) -> tuple[str, str, bool]:
        """Joins the live workers and returns the cluster's epoch and since (ms), and whether it is
        new: it is renewed when no other worker is alive. Workers joining together agree (the
        cluster row is locked while one joins)."""
        with self._tx() as cur:
            cur.execute("SELECT epoch, since_ms FROM cluster_state WHERE id = 1")
            if cur.fetchone() is None:
                cur.execute(self._sql("INSERT INTO cluster_state (id, epoch, since_ms) VALUES (1, '', 0)"))
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            cur.execute("SELECT epoch, since_ms FROM cluster_state WHERE id = 1" + lock)
            epoch, since = cur.fetchone()
            cur.execute(
                self._sql("SELECT count(*) FROM workers WHERE expires_ms > NOW_MS AND worker_id <> :?"),
                (self.worker_id,),
            )
            others = int(cur.fetchone()[0])
            self._beat(cur)
            if others and epoch:
                return str(epoch), str(since), False
            cur.execute(self._sql("SELECT NOW_MS"))
            now = int(cur.fetchone()[0])
            cur.execute(
                self._sql("UPDATE cluster_state SET epoch = :?, since_ms = :? WHERE id = 1"), (new_epoch, now)
            )
            return new_epoch, str(now), True

    def claim_expiry(self, epoch: str) -> bool:
        """True once per cluster epoch: to the leader that ends the sessions not re-announced."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE cluster_state SET expired_epoch = :? WHERE id = 1 AND epoch = :? "
                    "AND (expired_epoch IS NULL OR expired_epoch <> :?)"
                ),
                (epoch, epoch, epoch),
            )
            return bool(cur.rowcount)

    # --- leases ------------------------------------------------------------------------------

    def owners(self) -> dict[int, tuple[str | None, bool]]:
        """partition -> (owner, lease still running)."""
        with self._tx() as cur:
            cur.execute(self._sql("SELECT partition, owner, expires_ms > NOW_MS FROM partition_leases"))
            return {int(p): (o, bool(alive)) for p, o, alive in cur.fetchall()}

    def epochs(self) -> dict[int, int]:
        """partition -> its lease epoch (0: no worker ever held it); the housekeeping lease left out."""
        with self._tx() as cur:
            cur.execute(self._sql("SELECT partition, epoch FROM partition_leases WHERE partition >= 0"))
            return {int(p): int(e) for p, e in cur.fetchall()}

    def acquire(self, partition: int) -> Lease | None:
        """Takes a partition whose lease is free or expired, with a new epoch; None if it is held.

        On PostgreSQL, the database sessions of a worker whose lease expired are ended first: a
        worker paused in the middle of a statement holds its row locks (the lease row among them)
        until then, and fencing makes sure that it commits nothing once it runs again."""
        if self.dialect == "postgresql":
            self._end_sessions_of_expired(partition)
        with self._tx() as cur:
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            cur.execute(
                self._sql("SELECT owner FROM partition_leases WHERE partition = :?" + lock), (partition,)
            )
            row = cur.fetchone()
            previous = row[0] if row else None
            cur.execute(
                self._sql(
                    "UPDATE partition_leases SET owner = :?, epoch = epoch + 1, expires_ms = NOW_MS + :? "
                    "WHERE partition = :? AND (owner IS NULL OR expires_ms < NOW_MS)"
                ),
                (self.worker_id, self.ttl_ms, partition),
            )
            if cur.rowcount == 0:
                return None
            cur.execute(
                self._sql("SELECT epoch, applied_seq FROM partition_leases WHERE partition = :?"),
                (partition,),
            )
            epoch, applied = cur.fetchone()
            expired = previous if previous and previous != self.worker_id else None
            return Lease(partition, int(epoch), int(applied), expired)

    def adopt_log(self, name: str, created: str, last_seq: int) -> int | None:
        """Records the command log (a stream and its creation time) that `applied_seq` counts in.

        If the database counted in another one, every partition's `applied_seq` goes back to 0 and
        the highest one before is returned. Another one means that the recorded stream was created at
        another time, or, with none recorded yet, that a partition was applied past this stream's
        last sequence. Otherwise the result is None. Without this, a new NATS cluster (or one whose
        JetStream data was removed) under a database used before had its new commands taken for
        redeliveries of ones already applied, and skipped.
        """
        with self._tx() as cur:
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            # one worker at a time: the housekeeping lease's row always exists
            cur.execute(
                self._sql("SELECT owner FROM partition_leases WHERE partition = :?" + lock), (LEADER,)
            )
            cur.execute(self._sql("SELECT created FROM command_logs WHERE name = :?"), (name,))
            row = cur.fetchone()
            if row is not None and row[0] == created:
                return None
            cur.execute("SELECT COALESCE(MAX(applied_seq), 0) FROM partition_leases")
            highest = int(cur.fetchone()[0])
            if row is None:
                cur.execute(
                    self._sql("INSERT INTO command_logs (name, created) VALUES (:?, :?)"), (name, created)
                )
            else:
                cur.execute(
                    self._sql("UPDATE command_logs SET created = :? WHERE name = :?"), (created, name)
                )
            if (row is None and highest <= last_seq) or highest == 0:
                return None
            cur.execute("UPDATE partition_leases SET applied_seq = 0")
            return highest

    def _end_sessions_of_expired(self, partition: int) -> None:
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT owner FROM partition_leases "
                    "WHERE partition = :? AND owner IS NOT NULL AND owner <> :? AND expires_ms < NOW_MS"
                ),
                (partition, self.worker_id),
            )
            row = cur.fetchone()
        if row is None or not self.worker_id:
            return
        owner = str(row[0])
        try:
            with self._tx() as cur:
                cur.execute(
                    self._sql(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = :? "
                        "AND pid <> pg_backend_pid()"
                    ),
                    (session_name(owner),),
                )
                ended = int(cur.fetchone()[0])
        except Exception as exc:  # not allowed to (another role): the lock and idle timeouts remain
            log.warning("cannot end the database sessions of %s, whose lease expired: %s", owner, exc)
            return
        if ended:
            log.warning("ended %d database session(s) of %s, whose lease expired", ended, owner)

    def renew(self, leases: list[Lease]) -> set[int]:
        """Extends these leases; returns the partitions that are no longer ours."""
        lost: set[int] = set()
        with self._tx() as cur:
            for lease in leases:
                cur.execute(
                    self._sql(
                        "UPDATE partition_leases SET expires_ms = NOW_MS + :? "
                        "WHERE partition = :? AND owner = :? AND epoch = :?"
                    ),
                    (self.ttl_ms, lease.partition, self.worker_id, lease.epoch),
                )
                if cur.rowcount == 0:
                    lost.add(lease.partition)
        return lost

    def release(self, lease: Lease) -> None:
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE partition_leases SET owner = NULL, expires_ms = 0 "
                    "WHERE partition = :? AND owner = :? AND epoch = :?"
                ),
                (lease.partition, self.worker_id, lease.epoch),
            )

    def applied(self, partition: int) -> tuple[str | None, int, int]:
        """(owner, epoch, applied_seq) of a partition as committed."""
        with self._tx() as cur:
            cur.execute(
                self._sql("SELECT owner, epoch, applied_seq FROM partition_leases WHERE partition = :?"),
                (partition,),
            )
            owner, epoch, applied = cur.fetchone()
            return owner, int(epoch), int(applied)

    def record(self, cursor: Any, lease: Lease, first_seq: int, last_seq: int) -> None:
        """Inside a batch's transaction, on its connection, after its commands: fences the batch and
        records it applied.

        Raises `Fenced` unless this worker still holds the partition at this epoch and no batch
        overlapping [first_seq, last_seq] was applied already. The row stays locked until the
        transaction ends, so a takeover waits for it and then sees `applied_seq` as committed.
        """
        cursor.execute(
            self._sql(
                "UPDATE partition_leases SET applied_seq = :? "
                "WHERE partition = :? AND owner = :? AND epoch = :? AND applied_seq < :?"
            ),
            (last_seq, lease.partition, self.worker_id, lease.epoch, first_seq),
        )
        if cursor.rowcount != 1:
            raise Fenced(f"partition {lease.partition}: lease epoch {lease.epoch} is no longer ours")


def session_name(worker_id: str) -> str:
    """The `application_name` of a worker's database sessions."""
    return f"chat-bridge {worker_id}"


def new_worker_id() -> str:
    return f"w-{secrets.token_hex(4)}"
