"""Health and metrics: what `/healthz` and `/metrics` report (served by bridge/http.py).

One `Metrics` object per bridge process, built by `chat-bridge serve` and passed down; nothing is
registered at import time, so tests and several bridges in one process never share counters. The
runtime and the service increment the counters; `Health` asks the runtime whether the broker is
connected and probes the database itself, on a connection of its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

PREFIX = "chat_bridge"

# Command handling takes 10 µs to a few ms; an outage can hold one for seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Metrics:
    """The bridge's Prometheus metrics, in a registry of their own.

    Label values come from a fixed set (command names of the protocol, error codes, delivery
    kinds): a client can never create new series. A command name that is not one of the protocol's
    is counted as `unknown`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.commands = Counter(
            f"{PREFIX}_commands",
            "Commands handled, by command name and outcome (ok, or the error code answered).",
            ["command", "outcome"],
            registry=r,
        )
        self.command_seconds = Histogram(
            f"{PREFIX}_command_duration_seconds",
            "Time to validate and apply one command, inside its batch's transaction.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events_published = Counter(
            f"{PREFIX}_events_published",
            "Events handed to the broker, by destination (inbox, conversation, presence, notification).",
            ["kind"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited",
            "Commands refused because their sender was over its rate limit (answered or not).",
            registry=r,
        )
        self.dropped = Counter(
            f"{PREFIX}_dropped",
            "Messages the bridge did not apply or answer, by reason.",
            ["reason"],
            registry=r,
        )
        self.broker_reconnects = Counter(
            f"{PREFIX}_broker_reconnects",
            "Times the bridge connected to its broker again after losing it.",
            registry=r,
        )
        self.database_retries = Counter(
            f"{PREFIX}_database_retries",
            "Transactions retried because the database was unavailable or a connection was lost.",
            registry=r,
        )
        # Read from the database at each scrape (Health.refresh), not counted in the hot path.
        self.outbox_size = Gauge(
            f"{PREFIX}_outbox_size",
            "Events committed but not yet acknowledged by the broker (rows in the outbox).",
            registry=r,
        )
        self.sessions_active = Gauge(
            f"{PREFIX}_sessions_active", "Client sessions the bridge counts as active.", registry=r
        )
        self.broker_connected = Gauge(
            f"{PREFIX}_broker_connected", "1 while the bridge is connected to its broker.", registry=r
        )
        self.database_up = Gauge(
            f"{PREFIX}_database_up", "1 when the last database probe succeeded.", registry=r
        )
        # The children of the hot path's label sets, looked up once: `labels()` takes a lock and
        # checks its arguments on every call (two calls per command).
        self._command_counts: dict[tuple[str, str], Any] = {}
        self._command_timers: dict[str, Any] = {}

    def count_command(self, command: str, outcome: str) -> None:
        """One more command of that name (`unknown` for none of the protocol's) and outcome."""
        child = self._command_counts.get((command, outcome))
        if child is None:
            child = self._command_counts[(command, outcome)] = self.commands.labels(command, outcome)
        child.inc()

    def time_command(self, command: str, seconds: float) -> None:
        """How long one command of that name took to validate and apply."""
        child = self._command_timers.get(command)
        if child is None:
            child = self._command_timers[command] = self.command_seconds.labels(command)
        child.observe(seconds)

    def totals(self) -> dict[str, float]:
        """Running totals over all labels, for the log's throughput summary."""
        out = {"commands": 0.0, "errors": 0.0, "events": 0.0}
        for metric in self.commands.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out["commands"] += sample.value
                    if sample.labels.get("outcome") != "ok":
                        out["errors"] += sample.value
        for metric in self.events_published.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out["events"] += sample.value
        return out

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at the database: reachable or why not, and its counts when it answered."""

    reachable: bool
    error: str | None = None
    outbox: int | None = None
    sessions_active: int | None = None


_COUNTS = "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM sessions WHERE ended_ms IS NULL)"


def database_probe(url: str, timeout: float = 2.0) -> Callable[[], Probe]:
    """A function that checks the database at `url` on a fresh connection of its own.

    A pooled connection would keep answering from a SQLite file that was deleted (the inode lives
    on while open) or hide a PostgreSQL server that went away until the next transaction: each probe
    opens a new one. A SQLite file is opened read-write without creating it, so a missing file is
    reported as missing instead of being recreated empty.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            return lambda: Probe(True)  # in this process: reachable while the bridge runs
        path = Path(database).resolve()

        def probe_sqlite() -> Probe:
            if not path.exists():
                return Probe(False, f"the database file {path} does not exist")
            try:
                conn = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=timeout)
                try:
                    outbox, sessions = conn.execute(_COUNTS).fetchone()
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                return Probe(False, f"{type(exc).__name__}: {exc}")
            return Probe(True, None, int(outbox), int(sessions))

        return probe_sqlite

    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": max(1, int(timeout)),
            "options": f"-c statement_timeout={int(timeout * 1000)}",
        }
    engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)

    def probe_sql() -> Probe:
        try:
            with engine.connect() as conn:
                row = conn.execute(text(_COUNTS)).one()
        except Exception as exc:
            cause = getattr(exc, "orig", None) or exc
            first_line = (str(cause).strip().splitlines() or [""])[0]
            return Probe(False, f"{type(cause).__name__}: {first_line}")
        return Probe(True, None, int(row[0]), int(row[1]))

    return probe_sql


class Summary:
    """Logs what the bridge did every `every` seconds (INFO; nothing when it was idle)."""

    def __init__(self, metrics: Metrics, every: float, sessions: Callable[[], int | None]) -> None:
        self.metrics = metrics
        self.every = every
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="summary", daemon=True)

    def start(self) -> None:
        if self.every > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = self.metrics.totals()
        while not self._stop.wait(self.every):
            now = self.metrics.totals()
            done = {key: now[key] - last[key] for key in now}
            last = now
            if any(done.values()):
                log.info(
                    "last %gs: %d commands (%.1f/s, %d answered with an error), %d events published; "
                    "%s sessions active",
                    self.every,
                    done["commands"],
                    done["commands"] / self.every,
                    done["errors"],
                    done["events"],
                    self.sessions(),
                )


class Health:
    """What `/healthz` says: healthy while the broker is connected and the database answers.

    The runtime reports the broker connection (`broker_up`, `broker_down`); the database is probed
    when asked, at most once per `min_interval` seconds, and a probe that takes longer than
    `timeout` counts as unreachable (it may finish later; no second one starts meanwhile).
    """

    def __init__(
        self,
        metrics: Metrics,
        database: Callable[[], Probe],
        *,
        epoch: str = "",
        broker: str = "",
        timeout: float = 3.0,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.epoch = epoch
        self.broker = broker
        self.timeout = timeout
        self.min_interval = min_interval
        self.clock = clock
        self._database = database
        self._lock = threading.Lock()
        self._connected = False
        self._broker_error: str | None = "not connected yet"
        self._connects = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="health-probe")
        self._running: concurrent.futures.Future[Probe] | None = None
        self._last: Probe | None = None
        self._last_at = 0.0
        self._beat: float | None = None  # when the bridge's event loop last ran its heartbeat
        self.loop_stall = 5.0  # seconds without a heartbeat: the loop is stuck, the bridge unhealthy

    # --- reported by the runtime ---------------------------------------------

    def broker_up(self) -> None:
        with self._lock:
            self._connected, self._broker_error = True, None
            self._connects += 1
            if self._connects > 1:
                self.metrics.broker_reconnects.inc()
        self.metrics.broker_connected.set(1)

    def broker_down(self, error: str) -> None:
        with self._lock:
            self._connected, self._broker_error = False, error
        self.metrics.broker_connected.set(0)

    def loop_beat(self) -> None:
        """Called every second from the bridge's event loop (which also runs the embedded broker):
        a loop that stops running its tasks (a busy loop in a library, a blocking call) stops the
        beats, and /healthz says so instead of reporting a connection that nothing serves."""
        with self._lock:
            self._beat = self.clock()

    # --- asked by the HTTP server ----------------------------------------------

    def probe_database(self) -> Probe:
        with self._lock:
            if self._last is not None and self.clock() - self._last_at < self.min_interval:
                return self._last
            if self._running is None or self._running.done():
                self._running = self._executor.submit(self._database)
            running = self._running
        try:
            result = running.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            result = Probe(False, f"the database did not answer within {self.timeout:g}s")
        except Exception as exc:  # a probe must never take the HTTP server down
            result = Probe(False, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._last, self._last_at = result, self.clock()
        return result

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON body of /healthz); also refreshes the gauges read from the database."""
        db = self.probe_database()
        with self._lock:
            connected, broker_error = self._connected, self._broker_error
            stalled = None if self._beat is None else self.clock() - self._beat
        if stalled is not None and stalled > self.loop_stall:
            connected = False
            broker_error = f"the bridge's event loop has not run for {stalled:.0f}s"
        self.metrics.database_up.set(1 if db.reachable else 0)
        if db.outbox is not None:
            self.metrics.outbox_size.set(db.outbox)
        if db.sessions_active is not None:
            self.metrics.sessions_active.set(db.sessions_active)
        healthy = connected and db.reachable
        body: dict[str, Any] = {
            "status": "ok" if healthy else "unavailable",
            "epoch": self.epoch,
            "broker": {"url": self.broker, "connected": connected, "error": broker_error},
            "database": {"reachable": db.reachable, "error": db.error},
            "outbox_backlog": db.outbox,
            "sessions_active": db.sessions_active,
        }
        return healthy, body

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
