"""Chaos for the scale-out topology: users chat over NATS while workers and NATS nodes fail.

U users in direct pairs send numbered messages (QoS 1) to their partners at a steady pace, from
MQTT sessions that survive reconnects (fixed client ids, clean session off; a client whose node
died connects to the next node). Meanwhile, on a schedule:

  kill      SIGKILL the housekeeping leader (wills and status move too); a new worker starts
  pause     SIGSTOP a worker past its lease, wait until the others hold all its partitions, SIGCONT
            it: it must not commit anything with its old leases (the logs say `fenced` or `lost')
  node      SIGKILL a NATS node (three-node cluster only)
  join      add a worker
  leave     stop a worker cleanly (SIGTERM: it hands its partitions over)
  wills     a few users publish some messages and a `connect`, then their connection dies
            abruptly: NATS publishes their last will (`disconnect`)

Afterwards it checks the database: every acknowledged command stored (0 lost), none twice, `seq`
gapless in every conversation, each user's messages in the order sent, each will applied after the
user's earlier commands (its session ended, after its messages). It prints those counts and the
takeover times (kill -> every partition of the dead worker owned again), the longest time no
command was applied, and the publish stall of the clients on a killed node (last PUBACK before the
kill -> first after).

    python bench/chaos_scaleout.py [--nodes 3] [--workers 3] [--users 40] [--rate 5] [--lease 4]

Needs nats-server (2.9) and PostgreSQL (CHAT_BRIDGE_TEST_POSTGRES; a scratch database is created
and dropped). tests/integration/test_scaleout_chaos.py runs a short single-node pass of it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaleout import (
    BRIDGE_PW,
    NatsCluster,
    WorkerProc,
    connect_all,
    lease_table,
    mqtt_client,
    nats_cluster,
    pg,
    scratch_database,
    setup_pairs,
)


def acknowledged(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged a QoS 1 publish (paho keeps rc NO_CONN for a message
    published while disconnected, even once it went out after the reconnect)."""
    if info.rc == paho.MQTT_ERR_NO_CONN:
        info.rc = paho.MQTT_ERR_SUCCESS
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


@dataclass
class Sender:
    """One user's MQTT session: sends numbered messages into its conversation."""

    user: str
    conversation: str
    ports: list[int]
    node: int
    msg_ids: bool
    infos: list[paho.MQTTMessageInfo] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)  # PUBACK times
    reconnects: int = 0  # connections lost
    refused: int = 0  # connection attempts that failed (a dead node)

    def __post_init__(self) -> None:
        self.mqtt = mqtt_client(f"{self.user}:chaos", self.ports[self.node], self.user, clean=False)
        self.mqtt.max_queued_messages_set(0)
        self.mqtt.max_inflight_messages_set(100)
        self.mqtt.reconnect_delay_set(0.2, 2)
        self.mqtt.on_publish = lambda *_a: self.acks.append(time.time())
        self.mqtt.on_disconnect = self._lost
        # paho reports a failed reconnection here, not in on_disconnect: without it, a client whose
        # connection to a live node was closed and that moved on to the dead node stayed there
        self.mqtt.on_connect_fail = self._failed

    def _lost(self, client: paho.Client, *_a: Any) -> None:
        self.reconnects += 1
        self._next(client)

    def _failed(self, client: paho.Client, *_a: Any) -> None:
        self.refused += 1
        self._next(client)

    def _next(self, client: paho.Client) -> None:
        """A client whose node is gone, or that cannot connect, tries the next node (its session
        lives in JetStream)."""
        if len(self.ports) > 1:
            self.node = (self.node + 1) % len(self.ports)
            client._port = self.ports[self.node]  # paho's setter refuses while it tears down

    def send(self, n: int) -> None:
        fields: dict[str, Any] = {"conversation_id": self.conversation, "body": f"{self.user} {n}"}
        if self.msg_ids:
            fields["client_msg_id"] = f"{self.user}-{n}"
        self.infos.append(
            self.mqtt.publish(f"chat/v1/users/{self.user}/commands/send-message", orjson.dumps(fields), qos=1)
        )

    def acked(self) -> int:
        """How many of its messages, from the first on, the broker acknowledged."""
        count = 0
        for info in self.infos:
            if not acknowledged(info):
                break
            count += 1
        return count


class Stack:
    """The NATS nodes, the database and the workers of one chaos run."""

    def __init__(
        self, workdir: Path, database_url: str, users: list[str], nodes: int, partitions: int, lease: float
    ) -> None:
        self.cluster: NatsCluster = nats_cluster(workdir / "nats", users, nodes, partitions)
        self.database_url = database_url
        self.lease = lease
        self.workers: list[WorkerProc] = []
        self.dead: list[WorkerProc] = []
        self.next_node = 0
        port = self.cluster.nodes[0].mqtt_port
        self.probe = mqtt_client("chat-bridge:chaos-probe", port, None)
        self.probe.username_pw_set("chat-bridge", BRIDGE_PW)
        connect_all([(self.probe, port, [])])  # NATS creates its MQTT streams on a first connection

    def live_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.cluster.nodes) if n.proc and n.proc.poll() is None]

    def add_worker(self) -> WorkerProc:
        nodes = self.live_nodes()
        node = nodes[self.next_node % len(nodes)]
        self.next_node += 1
        w = WorkerProc(self.cluster, self.database_url, node=node, lease=self.lease)
        self.workers.append(w)
        return w

    def wait_online(self, timeout: float) -> None:
        """Until one of the workers leads and says the bridge is online."""
        deadline = time.monotonic() + timeout
        while not any(w.count("bridge online") for w in self.workers):
            if time.monotonic() > deadline:
                raise TimeoutError("no worker said `bridge online`:\n" + self.workers[0].text()[-3000:])
            time.sleep(0.1)

    def leader(self) -> WorkerProc:
        with pg(self.database_url) as conn:
            owner = conn.execute("SELECT owner FROM partition_leases WHERE partition = -1").fetchone()[0]
        return next((w for w in self.workers if w.id == owner), self.workers[0])

    def owned_by(self, worker_id: str | None) -> int:
        return sum(1 for o, _ in lease_table(self.database_url).values() if o == worker_id)

    def wait_all_owned_without(self, worker_id: str | None, timeout: float) -> float:
        """Seconds until every partition is held by live workers other than `worker_id`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(Exception):
                table = lease_table(self.database_url)
                if all(o is not None and o != worker_id for o, _ in table.values()):
                    return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"the partitions of {worker_id} were not all taken over in {timeout:.0f}s")

    def stop(self) -> None:
        for w in self.workers + self.dead:
            w.stop()
        with contextlib.suppress(Exception):
            self.probe.disconnect()
            self.probe.loop_stop()
        self.cluster.stop()


def stream_leaders(cluster: NatsCluster) -> dict[str, str | None]:
    """NATS's MQTT streams -> the node that leads each (JetStream stream info)."""
    import asyncio

    import nats

    async def ask() -> dict[str, str | None]:
        urls = [f"nats://chat-bridge:{BRIDGE_PW}@127.0.0.1:{n.client_port}" for n in cluster.nodes]
        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=2)
        try:
            js = nc.jetstream(timeout=10)
            out: dict[str, str | None] = {}
            for stream in ("$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs"):
                with contextlib.suppress(Exception):
                    info = await js.stream_info(stream)
                    out[stream] = info.cluster.leader if info.cluster else None
            return out
        finally:
            await nc.close()

    try:
        return asyncio.run(ask())
    except Exception:
        return {}


def will_users(stack: Stack, names: list[str], partner_conv: dict[str, str], messages: int) -> dict[str, str]:
    """Each of these users sends `messages` messages and a `connect` of its session, then its
    connection dies abruptly: NATS publishes its will. Returns user -> session id."""
    sessions = {}
    clients = []
    ports = [stack.cluster.nodes[i].mqtt_port for i in stack.live_nodes()]
    for i, u in enumerate(names):
        session = f"{u}-{int(time.time() * 1000)}"
        c = mqtt_client(f"{u}:will", ports[i % len(ports)], u)
        c.will_set(
            f"chat/v1/users/{u}/commands/disconnect",
            orjson.dumps({"session_id": session, "reason": "lost"}),
            qos=1,
        )
        clients.append((c, ports[i % len(ports)], []))
        sessions[u] = session
    connect_all(clients)
    for (c, _, _), u in zip(clients, names, strict=True):
        topic = f"chat/v1/users/{u}/commands/"
        infos = [c.publish(topic + "connect", orjson.dumps({"session_id": sessions[u]}), qos=1)]
        for n in range(messages):
            body = {"conversation_id": partner_conv[u], "body": f"{u} {n}"}
            infos.append(c.publish(topic + "send-message", orjson.dumps(body), qos=1))
        infos.append(c.publish(topic + "connect", orjson.dumps({"session_id": sessions[u]}), qos=1))
        for info in infos:
            info.wait_for_publish(30)
        c.socket().close()  # abrupt: no DISCONNECT packet, so NATS publishes the will
        c.loop_stop()
    return sessions


def run(
    *,
    users: int = 40,
    nodes: int = 3,
    workers: int = 3,
    partitions: int = 16,
    lease: float = 4.0,
    rate: float = 5.0,
    seconds: float = 40.0,
    schedule: list[tuple[float, str]] | None = None,
    kill_node: str = "n1",
    log: Any = print,
) -> dict[str, Any]:
    names = [f"u{i}" for i in range(users - users % 2)]
    will_names = ["w0", "w1", "w2"]
    if schedule is None:
        schedule = [(0.15, "kill"), (0.2, "wills"), (0.35, "pause"), (0.55, "join"), (0.7, "leave")]
        if nodes > 1:
            schedule.append((0.45, "node"))
        schedule = sorted((seconds * f, what) for f, what in schedule)
    workdir = Path(tempfile.mkdtemp(prefix="chat-chaos-scaleout-"))
    figures: dict[str, Any] = {"users": len(names), "nats_nodes": nodes, "workers_at_start": workers}
    events: list[str] = []
    with scratch_database("chat_chaos") as database_url:
        stack = Stack(workdir, database_url, names + will_names, nodes, partitions, lease)
        try:
            for _ in range(workers):
                stack.add_worker()
            stack.wait_online(120)
            for w in stack.workers:
                w.wait_log("took partition", 60)
            ports = [n.mqtt_port for n in stack.cluster.nodes]
            pairs = setup_pairs(ports, names, auth=True)
            will_pairs = setup_pairs(ports, ["w0", names[0], "w1", names[1], "w2", names[2]], auth=True)
            partner_conv = {a: conv for a, _, conv in will_pairs}
            # clients on the nodes in turn; with a node kill, node 0's are the ones that must move
            msg_ids = any(what == "node" for _, what in schedule)
            senders = []
            for i, (a, b, conv) in enumerate(pairs):
                for j, u in enumerate((a, b)):
                    senders.append(Sender(u, conv, ports, (2 * i + j) % len(ports), msg_ids))
            connect_all([(s.mqtt, s.ports[s.node], []) for s in senders])
            figures["client_msg_ids"] = msg_ids
            t0 = time.monotonic()
            stop_sending = threading.Event()

            def pace() -> None:
                n, next_at = 0, time.monotonic()
                while not stop_sending.is_set():
                    for s in senders:
                        s.send(n)
                    n += 1
                    next_at += 1 / rate
                    time.sleep(max(0.0, next_at - time.monotonic()))

            sender_thread = threading.Thread(target=pace, daemon=True)
            sender_thread.start()
            takeovers: list[float] = []
            paused: list[tuple[WorkerProc, int]] = []  # (worker, its log lines before the pause)
            sessions: dict[str, str] = {}
            node_kill_at: float | None = None
            killed_node = None
            for at, what in schedule:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                stamp = f"{time.monotonic() - t0:5.1f}s"
                if what == "kill":
                    victim = stack.leader()
                    victim.signal(signal.SIGKILL)
                    victim.proc.wait(10)
                    stack.workers.remove(victim)
                    stack.dead.append(victim)
                    stack.add_worker()
                    took = stack.wait_all_owned_without(victim.id, 10 * lease + 30)
                    takeovers.append(took)
                    events.append(
                        f"{stamp} SIGKILL worker {victim.id} (the leader); a new worker starts; "
                        f"its partitions owned again after {took:.1f}s"
                    )
                elif what == "pause":
                    victim = max(stack.workers, key=lambda w: stack.owned_by(w.id))
                    held = stack.owned_by(victim.id)
                    lines = len(victim.log)
                    victim.signal(signal.SIGSTOP)
                    took = stack.wait_all_owned_without(victim.id, 10 * lease + 30)
                    takeovers.append(took)
                    victim.signal(signal.SIGCONT)
                    line = victim.wait_log("lost partition", 30, after=lines)
                    paused.append((victim, lines))
                    events.append(
                        f"{stamp} SIGSTOP worker {victim.id} ({held} partitions); all taken over after "
                        f"{took:.1f}s; SIGCONT: it logged {line.split(': ', 1)[1].strip()!r}"
                    )
                elif what == "node":
                    leaders = stream_leaders(stack.cluster)
                    name = leaders.get(kill_node) or kill_node  # a node, or the node leading a stream
                    killed_node = next(i for i, n in enumerate(stack.cluster.nodes) if n.name == name)
                    led = [st for st, leader in leaders.items() if leader == name]
                    stack.cluster.nodes[killed_node].kill()
                    node_kill_at = time.time()
                    events.append(
                        f"{stamp} SIGKILL NATS node {name} (leader of {', '.join(led) or 'no MQTT stream'})"
                    )
                elif what == "join":
                    w = stack.add_worker()
                    w.wait_log("took partition", 60)
                    events.append(f"{stamp} worker {w.id} joins and takes partitions")
                elif what == "leave":
                    w = stack.workers.pop(0)
                    w.stop()
                    stack.dead.append(w)
                    events.append(f"{stamp} worker {w.id} stops cleanly (SIGTERM)")
                elif what == "wills":
                    sessions = will_users(stack, will_names, partner_conv, 5)
                    events.append(
                        f"{stamp} {len(sessions)} users publish, then their connections die (wills)"
                    )
            time.sleep(max(0.0, t0 + seconds - time.monotonic()))
            stop_sending.set()
            sender_thread.join()
            events.append(f"{time.monotonic() - t0:5.1f}s load ends")
            # what the broker has not acknowledged yet is still in the clients' sessions: wait for it
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(s.acked() < len(s.infos) for s in senders):
                time.sleep(0.2)
            sent = sum(len(s.infos) for s in senders)
            acked = {s.user: s.acked() for s in senders}
            want = sum(acked.values())
            # then for the workers to apply them: as long as they make progress (on a loaded machine
            # they may be minutes behind), until 60 s pass without a command applied
            rows: list[tuple[Any, ...]] = []
            progress_at, seen = time.monotonic(), -1
            while time.monotonic() < progress_at + 60:
                with pg(database_url) as conn:
                    rows = conn.execute(
                        "SELECT conversation_id, seq, sender_id, body, created_ms FROM messages"
                    ).fetchall()
                if sum(1 for r in rows if not str(r[2]).startswith("w")) >= want:
                    break
                if len(rows) != seen:
                    progress_at, seen = time.monotonic(), len(rows)
                time.sleep(0.3)
            time.sleep(1.0)  # anything applied late (twice) would show now
            with pg(database_url) as conn:
                rows = conn.execute(
                    "SELECT conversation_id, seq, sender_id, body, created_ms FROM messages"
                ).fetchall()
                ended = dict(
                    conn.execute(
                        "SELECT user_id, ended_ms FROM sessions WHERE session_id = ANY(%s)",
                        (list(sessions.values()),),
                    ).fetchall()
                )
            events.append(f"{time.monotonic() - t0:5.1f}s checked {len(rows)} stored messages")
            figures.update(check(rows, senders, acked, sessions, ended))
            figures["sent"] = sent
            figures["acknowledged"] = want
            figures["takeover_s"] = [round(t, 1) for t in takeovers]
            figures["client_reconnects"] = sum(s.reconnects for s in senders)
            figures["client_connects_refused"] = sum(s.refused for s in senders)
            if node_kill_at is not None:
                figures.update(publish_stall(senders, node_kill_at, killed_node))
            figures["longest_apply_gap_s"] = apply_gap(rows, figures["first_ms"], figures["last_ms"])
            figures.pop("first_ms")
            figures.pop("last_ms")
            # the batches a paused worker had in hand when it woke up, refused by the fence
            figures["paused_worker_fenced_batches"] = sum(
                sum("fenced" in x for x in w.log[lines:]) for w, lines in paused
            )
            figures["worker_log_fenced"] = sum(w.count("fenced") for w in stack.workers + stack.dead)
        except BaseException:
            for line in events:
                log(line)
            for w in stack.workers + stack.dead:  # what went wrong, for the one who reads the failure
                log(f"--- worker {w.id} (pid {w.pid}{'' if w.alive() else ', ended'})")
                log("".join(line for line in w.log if " bridge.service: " not in line)[-4000:])
            raise
        finally:
            stack.stop()
    for line in events:
        log(line)
    return figures


def check(
    rows: list[tuple[Any, ...]],
    senders: list[Sender],
    acked: dict[str, int],
    sessions: dict[str, str],
    ended: dict[str, int | None],
) -> dict[str, Any]:
    by_conv: dict[str, list[int]] = {}
    seen: dict[tuple[str, str], int] = {}
    by_user: dict[str, list[tuple[int, int]]] = {}
    created: dict[str, int] = {}
    for conv, seq, sender, body, created_ms in rows:
        by_conv.setdefault(conv, []).append(int(seq))
        seen[(sender, body)] = seen.get((sender, body), 0) + 1
        n = int(str(body).split()[1])
        by_user.setdefault(sender, []).append((int(seq), n))
        created[sender] = max(created.get(sender, 0), int(created_ms))
    gaps = sum(len(set(range(1, max(s) + 1)) - set(s)) + (len(s) - len(set(s))) for s in by_conv.values())
    twice = sum(c - 1 for c in seen.values() if c > 1)
    lost = 0
    order = 0
    applied = 0
    examples: list[str] = []
    for s in senders:
        mine = [n for _, n in sorted(by_user.get(s.user, []))]
        applied += len(set(mine))
        missing = [n for n in range(acked[s.user]) if (s.user, f"{s.user} {n}") not in seen]
        lost += len(missing)
        swapped = [(x, y) for x, y in itertools.pairwise(mine) if y <= x]
        order += len(swapped)
        if missing or swapped:  # which ones, for whoever has to find out why
            examples.append(f"{s.user}: not applied {missing[:5]}, out of order {swapped[:5]}")
    if examples:
        print("\n".join(examples[:20]), flush=True)
    wills_late = sum(1 for u in sessions if ended.get(u) is None)
    wills_early = sum(1 for u in sessions if ended.get(u) is not None and int(ended[u]) < created.get(u, 0))
    stamps = [int(r[4]) for r in rows]
    return {
        "applied": applied,
        "lost_acknowledged": lost,
        "applied_twice": twice,
        "seq_gaps": gaps,
        "order_violations": order,
        "wills": len(sessions),
        "wills_not_applied": wills_late,
        "wills_before_earlier_commands": wills_early,
        "first_ms": min(stamps) if stamps else 0,
        "last_ms": max(stamps) if stamps else 0,
    }


def apply_gap(rows: list[tuple[Any, ...]], first: int, last: int) -> float:
    stamps = sorted(int(r[4]) for r in rows if first <= int(r[4]) <= last)
    return round(max((b - a for a, b in itertools.pairwise(stamps)), default=0) / 1000, 2)


def publish_stall(senders: list[Sender], kill_at: float, node: int | None) -> dict[str, Any]:
    """For each client: last PUBACK before the kill -> first PUBACK after it."""
    stalls = []
    for s in senders:
        before = [t for t in s.acks if t <= kill_at]
        after = [t for t in s.acks if t > kill_at]
        if before and after:
            stalls.append(after[0] - max(before))
    stalls.sort()
    return {
        "publish_stall_median_s": round(stalls[len(stalls) // 2], 2) if stalls else None,
        "publish_stall_max_s": round(stalls[-1], 2) if stalls else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=3, choices=[1, 3])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--rate", type=float, default=5, help="messages per second per user")
    parser.add_argument("--seconds", type=float, default=40, help="how long the load lasts")
    parser.add_argument("--lease", type=float, default=4)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument(
        "--kill-node",
        default="n1",
        help="the NATS node to kill (n1, n2, n3), or the one leading a stream, e.g. '$MQTT_msgs' "
        "(the command log: the worst case)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    result = run(
        users=args.users,
        nodes=args.nodes,
        workers=args.workers,
        partitions=args.partitions,
        lease=args.lease,
        rate=args.rate,
        seconds=args.seconds,
        kill_node=args.kill_node,
    )
    for key, value in result.items():
        print(f"{key:32} {value}")
    print(f"took {time.monotonic() - started:.0f}s")
    bad = sum(
        result[k]
        for k in (
            "lost_acknowledged", "applied_twice", "seq_gaps", "order_violations",
            "wills_not_applied", "wills_before_earlier_commands",
        )
    )  # fmt: skip
    # every command sent must have been acknowledged in the end (the clients' sessions re-send)
    ok = bad == 0 and result["applied"] >= result["acknowledged"] == result["sent"]
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
