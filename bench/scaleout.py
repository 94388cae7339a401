"""Scale-out throughput: 1, 2 and 4 workers over NATS JetStream and PostgreSQL, beside one bridge on
Mosquitto with the same PostgreSQL, in one run.

U users in U/2 direct pairs; every user sends N messages (QoS 1, closed loop: as fast as paho lets
it) to its partner, so that every user is a sender and the partitions carry traffic by the hash of
many user ids. Load comes from two processes. For each topology it measures

  throughput   chat messages delivered to the partners / time from the first send to the last
               delivery (wall clock: on a shared machine this moves with the load)
  CPU/msg      each worker's process CPU time during the run / the messages it applied (its
               partitions' messages, from the database and the lease table), and the NATS
               server's CPU / all messages
  balance      messages per worker against the mean (target: within 20 %)

CPU time per message is the figure that shows scaling on a small machine: when every worker costs
what one costs per message and the messages are spread evenly, n workers on n cores carry n times
the load. On 2 cores 4 workers cannot run at once, so their wall-clock throughput does not grow.

    python bench/scaleout.py [--quick] [--users 256] [--messages 40] [--workers 1,2,4] [--cluster]
        [--nodes 1,3] [--no-mosquitto]

Needs nats-server (2.9), mosquitto and a PostgreSQL server (CHAT_BRIDGE_TEST_POSTGRES, default
postgresql://postgres@127.0.0.1:5432/postgres: scratch databases are created and dropped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from harness import ROOT, percentile, proc_stats, start_mosquitto, wait_for_line  # noqa: E402
from natscluster import NatsCluster  # noqa: E402

from bridge import natsconf  # noqa: E402
from chat_bridge._paho import OrderedClient  # noqa: E402

PG_ADMIN = os.environ.get("CHAT_BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BRIDGE_PW = "bridge-pw"
USER_PW = "user-pw"
PROCESSES = 2  # load generators


# --- the stack: PostgreSQL scratch database, NATS nodes, workers ---------------------------------


@contextlib.contextmanager
def scratch_database(prefix: str = "chat_bench") -> Iterator[str]:
    """A new PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot be used, or None."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return None
    except Exception as exc:
        return f"no PostgreSQL reachable at {PG_ADMIN} ({type(exc).__name__})"


def nats_cluster(workdir: Path, users: list[str], size: int, partitions: int) -> NatsCluster:
    """`size` NATS nodes with the chat account; the accounts' passwords in plain text (bcrypt at
    NATS's cost would spend seconds of CPU on the connects of a few hundred clients)."""
    cluster = NatsCluster(workdir, {}, size=size, partitions=partitions)
    accounts = {"chat-bridge": BRIDGE_PW, **{u: USER_PW for u in users}}
    (workdir / "users.conf").write_text(natsconf.users_conf(accounts))
    return cluster.start()


class WorkerProc:
    """`chat-bridge serve --nats-url ...` in a process of its own; its log kept in memory."""

    def __init__(
        self,
        cluster: NatsCluster,
        database_url: str,
        *,
        node: int = 0,
        lease: float = 10,
        extra: tuple[str, ...] = (),
    ) -> None:
        urls = ",".join(f"nats://chat-bridge:{BRIDGE_PW}@127.0.0.1:{x.client_port}" for x in cluster.nodes)
        # every node's MQTT listener, its own first: its MQTT connection moves on when that node dies
        k = node % len(cluster.nodes)
        order = cluster.nodes[k:] + cluster.nodes[:k]
        mqtt_urls = ",".join(f"mqtt://chat-bridge:{BRIDGE_PW}@127.0.0.1:{x.mqtt_port}" for x in order)
        self.log: list[str] = []
        args = [
            sys.executable, "-m", "bridge", "serve",
            "--nats-url", urls,
            "--broker-url", mqtt_urls,
            "--database-url", database_url,
            "--partitions", str(cluster.partitions),
            "--lease", str(lease),
            "--rate-limit", "0",
            "--cost-limit", "0",
            "--presence", "retained",
            "--http-listen", "off",
            *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.pid = self.proc.pid
        self.id: str | None = None  # the worker id, from its log
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.log.append(line)
                if self.id is None and " joins the cluster" in line:
                    self.id = line.split("worker ", 1)[1].split()[0]
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return "".join(self.log)

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.log)

    def wait_log(self, needle: str, timeout: float = 30, after: int = 0) -> str:
        """The first log line (from line `after` on) containing `needle`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.log[after:]:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._changed.wait(0.2)):
                    raise TimeoutError(f"worker log never said {needle!r}:\n{''.join(self.log[-30:])}")
                self._changed.wait(min(left, 0.5))

    def cpu(self) -> float:
        return proc_stats(self.pid)[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def lease_table(database_url: str) -> dict[int, tuple[str | None, int]]:
    """partition -> (owner with a running lease or None, epoch)."""
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql")) as conn:
        rows = conn.execute(
            "SELECT partition, CASE WHEN expires_ms > "
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) THEN owner END, epoch "
            "FROM partition_leases WHERE partition >= 0"
        ).fetchall()
    return {int(p): (o, int(e)) for p, o, e in rows}


def wait_balanced(database_url: str, workers: list[WorkerProc], partitions: int, timeout: float = 90) -> None:
    """Until the live workers hold every partition, evenly (to within one)."""
    deadline = time.monotonic() + timeout
    owned: dict[str, int] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            table = lease_table(database_url)
            owned = {}
            for owner, _ in table.values():
                if owner:
                    owned[owner] = owned.get(owner, 0) + 1
            ids = {w.id for w in workers}
            if (
                set(owned) == ids
                and sum(owned.values()) == partitions
                and max(owned.values()) - min(owned.values()) <= 1
            ):
                return
        time.sleep(0.2)
    raise TimeoutError(f"partitions never balanced over {len(workers)} workers: {owned}")


def pg(database_url: str) -> Any:
    import psycopg

    return psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql"))


# --- clients --------------------------------------------------------------------------------------


def mqtt_client(
    cid: str, port: int, user: str | None, on_message: Any = None, clean: bool = True
) -> paho.Client:
    c = OrderedClient(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean, protocol=paho.MQTTv311)
    if user is not None:
        c.username_pw_set(user, USER_PW)
    if on_message is not None:
        c.on_message = on_message
    c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
    return c


def connect_all(clients: list[tuple[paho.Client, int, list[str]]], timeout: float = 120) -> None:
    """Connects the clients, each subscribed (QoS 1) to its topics once this returns."""
    pending = threading.Semaphore(0)
    refused: list[str] = []
    tries: dict[paho.Client, int] = {}
    for c, port, topics in clients:

        def on_connect(
            cl: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any, topics: list[str] = topics
        ) -> None:
            if topics:
                cl.subscribe([(t, 1) for t in topics])
            else:
                pending.release()

        def on_subscribe(
            cl: paho.Client, _u: Any, _mid: int, codes: list[Any], _p: Any, topics: list[str] = topics
        ) -> None:
            if any(int(getattr(rc, "value", rc)) != 1 for rc in codes):  # granted QoS 1, nothing less
                # NATS refuses a subscription whose JetStream consumer it could not create within its
                # 4 s API timeout (seen on a loaded machine): ask again, a few times
                tries[cl] = tries.get(cl, 0) + 1
                if tries[cl] < 20:
                    threading.Timer(1.0, cl.subscribe, args=([(t, 1) for t in topics],)).start()
                    return
                refused.append(f"{cl._client_id.decode()}: {codes}")
            pending.release()

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.connect_async("127.0.0.1", port, keepalive=60)
        c.loop_start()
    deadline = time.monotonic() + timeout
    for _ in clients:
        if not pending.acquire(timeout=max(0.1, deadline - time.monotonic())):
            raise TimeoutError("clients did not connect and subscribe in time")
    if refused:
        raise RuntimeError(f"{len(refused)} subscriptions not granted at QoS 1: {refused[:5]}")


def setup_pairs(ports: list[int], users: list[str], auth: bool) -> list[tuple[str, str, str]]:
    """Every user announces a session; each pair gets a direct conversation. (a, b, conversation)."""
    answers: dict[str, dict[str, Any]] = {}
    got = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        event = orjson.loads(msg.payload)
        if event.get("request_id"):
            with got:
                answers[event["request_id"]] = event
                got.notify_all()

    clients = {
        u: mqtt_client(f"{u}:setup", ports[i % len(ports)], u if auth else None, on_message)
        for i, u in enumerate(users)
    }
    connect_all(
        [(c, ports[i % len(ports)], [f"chat/v1/users/{u}/inbox"]) for i, (u, c) in enumerate(clients.items())]
    )
    for u, c in clients.items():
        c.publish(
            f"chat/v1/users/{u}/commands/connect",
            orjson.dumps({"session_id": f"{u}-s", "request_id": f"c-{u}"}),
            qos=1,
        )
    with got:  # as long as answers keep coming (a loaded machine is slow), until 60 s without one
        seen = -1
        while not got.wait_for(lambda: all(f"c-{u}" in answers for u in users), 60):
            if len(answers) == seen:
                raise TimeoutError(
                    f"connect answered for {sum(f'c-{u}' in answers for u in users)} of {len(users)}"
                )
            seen = len(answers)
    pairs = [(users[i], users[i + 1]) for i in range(0, len(users) - 1, 2)]
    for a, b in pairs:
        body = {"kind": "direct", "participants": [b], "request_id": f"d-{a}"}
        clients[a].publish(f"chat/v1/users/{a}/commands/create-conversation", orjson.dumps(body), qos=1)
    with got:
        if not got.wait_for(lambda: all(f"d-{a}" in answers for a, _ in pairs), 120):
            raise TimeoutError("create-conversation not answered in time")
    for c in clients.values():
        c.disconnect()
        c.loop_stop()
    return [(a, b, answers[f"d-{a}"]["data"]["conversation"]["conversation_id"]) for a, b in pairs]


def load(
    ports: list[int],
    auth: bool,
    pairs: list[tuple[str, str, str]],
    messages: int,
    start_at: float,
    tag: str,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """One load process: both users of each of its pairs send `messages` to the other."""
    expected = 2 * len(pairs) * messages
    latencies: list[float] = []
    last = [0.0]
    lock = threading.Lock()
    done = threading.Event()
    got: dict[str, int] = {}

    def on_message(_c: Any, me: str, msg: paho.MQTTMessage) -> None:
        now = time.time()
        event = orjson.loads(msg.payload)
        if event["type"] != "message-added" or event["data"]["message"]["sender_id"] == me:
            return
        sent = float(event["data"]["message"]["body"].split("|", 1)[0])
        with lock:
            latencies.append((now - sent) * 1000)
            last[0] = now
            got[me] = got.get(me, 0) + 1
            if len(latencies) >= expected:
                done.set()

    members = [(u, conv) for a, b, conv in pairs for u in (a, b)]
    clients = []
    for i, (u, conv) in enumerate(members):
        c = mqtt_client(f"{u}:{tag}", ports[i % len(ports)], u if auth else None, on_message)
        c.user_data_set(u)
        clients.append((c, u, conv, ports[i % len(ports)]))
    connect_all([(c, port, [f"chat/v1/users/{u}/inbox"]) for c, u, _, port in clients])
    time.sleep(max(0.0, start_at - time.time()))
    first = time.time()
    for n in range(messages):
        for c, u, conv, _ in clients:
            body = orjson.dumps({"conversation_id": conv, "body": f"{time.time():.6f}|{n}"})
            c.publish(f"chat/v1/users/{u}/commands/send-message", body, qos=1)
    # until every delivery arrived, or none for 30 s
    seen = -1
    while not done.wait(30):
        with lock:
            if len(latencies) == seen:
                break
            seen = len(latencies)
    for c, *_ in clients:
        c.disconnect()
        c.loop_stop()
    short = {u: got.get(u, 0) for u, _ in members if got.get(u, 0) < messages}
    out.put({"first": first, "last": last[0], "latencies": latencies, "expected": expected, "short": short})


def drive(
    ports: list[int], auth: bool, pairs: list[tuple[str, str, str]], messages: int, tag: str
) -> dict[str, Any]:
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 3.0 + len(pairs) * 0.02
    procs = [
        mp.Process(target=load, args=(ports, auth, pairs[i::PROCESSES], messages, start_at, tag, out))
        for i in range(PROCESSES)
        if pairs[i::PROCESSES]
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=400) for _ in procs]
    for p in procs:
        p.join(30)
    lat = [x for r in results for x in r["latencies"]]
    short = {u: n for r in results for u, n in r["short"].items()}
    if short:
        print(f"  {tag}: deliveries missing for {len(short)} users (user: received): {short}", flush=True)
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    return {
        "delivered": len(lat),
        "expected": sum(r["expected"] for r in results),
        "seconds": round(last - first, 2),
        "msgs_per_s": round(len(lat) / max(last - first, 1e-9)),
        "p50_ms": round(percentile(lat, 0.5), 1),
        "p99_ms": round(percentile(lat, 0.99), 1),
        "first": first,
        "last": last,
        "short": short,
    }


class CpuSampler:
    """CPU seconds of some processes, sampled every 0.1 s, so that a run's figure ends at its last
    delivery (not after the wait that follows it)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._halt = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                values[name] = proc_stats(pid)[0]
        self.samples.append((time.time(), values))

    def _run(self) -> None:
        while not self._halt.wait(0.1):
            self._sample()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join()
        self._sample()

    def used(self, until: float) -> dict[str, float]:
        """CPU seconds from the start to the first sample at or after `until`."""
        start = self.samples[0][1]
        end = next((v for t, v in self.samples if t >= until), self.samples[-1][1])
        return {name: end.get(name, 0.0) - start.get(name, 0.0) for name in self.pids}


# --- runs -----------------------------------------------------------------------------------------


def messages_by_sender(database_url: str, since_ms: int) -> dict[str, int]:
    with pg(database_url) as conn:
        rows = conn.execute(
            "SELECT sender_id, count(*) FROM messages WHERE created_ms >= %s GROUP BY sender_id", (since_ms,)
        ).fetchall()
    return {str(s): int(n) for s, n in rows}


def nats_run(
    cluster: NatsCluster, database_url: str, pairs: list[tuple[str, str, str]], n: int, messages: int
) -> dict[str, Any]:
    """`n` workers (fresh processes), once they share the partitions evenly, under the load."""
    workers = [WorkerProc(cluster, database_url, node=i) for i in range(n)]
    try:
        for w in workers:
            w.wait_log("joins the cluster", 60)
        wait_balanced(database_url, workers, cluster.partitions)
        before = lease_table(database_url)
        time.sleep(1.0)  # the last consumers' first fetches
        pids = {str(w.id): w.pid for w in workers}
        pids.update({f"nats-{node.name}": node.proc.pid for node in cluster.nodes if node.proc})
        sampler = CpuSampler(pids)
        since = int(time.time() * 1000)
        ports = [node.mqtt_port for node in cluster.nodes]
        result = drive(ports, True, pairs, messages, f"r{n}")
        sampler.stop()
        used = sampler.used(result["last"])
        after = lease_table(database_url)
    finally:
        for w in workers:
            w.stop()
    if before != after:
        raise RuntimeError("a partition changed hands during the run: the figures would not be per worker")
    senders = messages_by_sender(database_url, since)
    per_worker = {w.id: 0 for w in workers}
    for user, count in senders.items():
        owner = before[natsconf.partition_of(user, cluster.partitions)][0]
        per_worker[owner] = per_worker.get(owner, 0) + count
    applied = sum(per_worker.values())
    mean = applied / n
    workers_rows = [
        {
            "worker": wid,
            "partitions": sum(1 for o, _ in before.values() if o == wid),
            "messages": per_worker[wid],
            "vs_mean_percent": round((per_worker[wid] - mean) / mean * 100, 1) if mean else None,
            "cpu_s": round(used[wid], 2),
            "cpu_us_per_msg": round(used[wid] / per_worker[wid] * 1e6) if per_worker[wid] else None,
        }
        for wid in sorted(per_worker)
    ]
    total_cpu = sum(used[str(w.id)] for w in workers)
    nats_cpu = sum(v for k, v in used.items() if k.startswith("nats-"))
    return {
        **result,
        "topology": f"NATS {plural(len(cluster.nodes), 'node')}, {plural(n, 'worker')}",
        "workers": n,
        "applied": applied,
        "cpu_us_per_msg": round(total_cpu / applied * 1e6) if applied else None,
        "broker_cpu_us_per_msg": round(nats_cpu / applied * 1e6) if applied else None,
        "max_imbalance_percent": max(abs(r["vs_mean_percent"] or 0) for r in workers_rows),
        "per_worker": workers_rows,
    }


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def mosquitto_run(workdir: Path, users: list[str], messages: int) -> dict[str, Any]:
    """One bridge on Mosquitto with PostgreSQL: the same load shape, for comparison."""
    with scratch_database() as database_url:
        broker, port = start_mosquitto(workdir)
        bridge = subprocess.Popen(
            [
                sys.executable, "-m", "bridge", "serve",
                "--broker-url", f"mqtt://127.0.0.1:{port}",
                "--database-url", database_url,
                "--rate-limit", "0", "--cost-limit", "0", "--presence", "retained", "--http-listen", "off",
            ],
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            wait_for_line(bridge, "bridge online", 60)
            pairs = setup_pairs([port], users, auth=False)
            sampler = CpuSampler({"bridge": bridge.pid, "broker": broker.pid})
            result = drive([port], False, pairs, messages, "m")
            sampler.stop()
            used = sampler.used(result["last"])
            cpu, broker_cpu = used["bridge"], used["broker"]
            applied = sum(messages_by_sender(database_url, int(result["first"] * 1000) - 5000).values())
        finally:
            bridge.terminate()
            bridge.wait(30)
            broker.terminate()
            broker.wait(30)
    return {
        **result,
        "topology": "Mosquitto, 1 bridge",
        "workers": 1,
        "applied": applied,
        "cpu_us_per_msg": round(cpu / applied * 1e6) if applied else None,
        "broker_cpu_us_per_msg": round(broker_cpu / applied * 1e6) if applied else None,
        "max_imbalance_percent": 0.0,
        "per_worker": [{"worker": "bridge", "messages": applied, "cpu_s": round(cpu, 2)}],
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'topology':24} {'delivered':>9} {'seconds':>8} {'msg/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/msg':>10} {'broker us/msg':>13} {'imbalance':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['topology']:24} {r['delivered']:>9} {r['seconds']:>8} {r['msgs_per_s']:>7} {r['p50_ms']:>8} "
            f"{r['p99_ms']:>8} {r['cpu_us_per_msg']!s:>10} {r['broker_cpu_us_per_msg']!s:>13} "
            f"{'±' + str(round(r['max_imbalance_percent'])) + ' %':>9}"
        )
    lines.append("")
    lines.append(
        f"{'per worker':24} {'partitions':>10} {'messages':>9} {'vs mean':>8} {'CPU s':>7} {'CPU us/msg':>10}"
    )
    for r in rows:
        if not r["topology"].startswith("NATS"):
            continue
        for w in r["per_worker"]:
            lines.append(
                f"{r['topology']:24} {w['partitions']:>10} {w['messages']:>9} {w['vs_mean_percent']:>+7}% "
                f"{w['cpu_s']:>7} {w['cpu_us_per_msg']!s:>10}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 users, 20 messages each")
    parser.add_argument("--users", type=int, help="users, in direct pairs (default 256)")
    parser.add_argument("--messages", type=int, help="per user (default 40)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--partitions", type=int, default=natsconf.DEFAULT_PARTITIONS)
    parser.add_argument("--cluster", action="store_true", help="also over a 3-node NATS cluster")
    parser.add_argument("--nodes", help="NATS cluster sizes to run, comma-separated (1, 3; default 1)")
    parser.add_argument("--no-mosquitto", action="store_true", help="skip the Mosquitto bridge")
    parser.add_argument("--json", type=Path, default=Path("bench/results/scaleout.json"))
    args = parser.parse_args()
    users_n = args.users or (64 if args.quick else 256)
    messages = args.messages or (20 if args.quick else 40)
    counts = [int(x) for x in args.workers.split(",")]
    reason = postgres_missing()
    if reason:
        raise SystemExit(reason)
    users = [f"u{i}" for i in range(users_n - users_n % 2)]
    workdir = Path(tempfile.mkdtemp(prefix="chat-scaleout-"))
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    if not args.no_mosquitto:
        rows.append(mosquitto_run(workdir, users, messages))
        print(table(rows[-1:]).splitlines()[1], flush=True)
    sizes = [int(x) for x in args.nodes.split(",")] if args.nodes else [1, 3] if args.cluster else [1]
    for size in sizes:
        with scratch_database() as database_url:
            cluster = nats_cluster(workdir / f"nats{size}", users, size, args.partitions)
            try:
                # NATS creates its MQTT streams on the first MQTT connection; the workers wait for them
                probe = mqtt_client("chat-bridge:bench-probe", cluster.nodes[0].mqtt_port, None)
                probe.username_pw_set("chat-bridge", BRIDGE_PW)
                connect_all([(probe, cluster.nodes[0].mqtt_port, [])])
                setup = WorkerProc(cluster, database_url)  # creates the schema and the users' sessions
                try:
                    setup.wait_log("bridge online", 90)
                    pairs = setup_pairs([n.mqtt_port for n in cluster.nodes], users, auth=True)
                finally:
                    setup.stop()
                for n in counts:
                    rows.append(nats_run(cluster, database_url, pairs, n, messages))
                    print(table(rows[-1:]).splitlines()[1], flush=True)
            finally:
                cluster.stop()
    title = (
        f"{len(users)} users in {len(users) // 2} direct pairs, each sending {messages} messages to its "
        f"partner (QoS 1, closed loop), PostgreSQL, {args.partitions} partitions, {os.cpu_count()} cores"
    )
    print()
    print(title)
    print(table(rows))
    print(f"took {time.monotonic() - started:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("first", None)
        r.pop("last", None)
    args.json.write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
