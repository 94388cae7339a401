"""Chaos: clients chat while the bridge is SIGKILLed and restarted and the broker restarts.

K clients send M messages each (every one with a client_msg_id) into direct
conversations and one group, at a steady pace, while the bridge process is
killed with SIGKILL and started again several times and Mosquitto (with
persistence) is restarted once. Clients keep their MQTT sessions (fixed
client ids, clean session off) and re-send, with the same client_msg_id,
anything the broker has not acknowledged. Afterwards it prints:

    sent, acknowledged by the broker, stored        (should all be K x M)
    stored twice, seq gaps, never seen               (must all be 0)

"never seen" counts, for every participant of every conversation, stored
messages it neither received live nor got back from get-messages.

    python bench/chaos.py [--clients 5] [--messages 200] [--kills 4]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, free_port, wait_for_line

from chat_bridge._paho import OrderedClient


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


@dataclass
class Client:
    user: str
    port: int
    seen: set[str] = field(default_factory=set)  # message ids received live
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> event
    infos: dict[str, paho.MQTTMessageInfo] = field(default_factory=dict)  # client_msg_id -> publish
    payloads: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.mqtt = OrderedClient(
            CallbackAPIVersion.VERSION2, client_id=f"chaos-{self.user}", clean_session=False
        )
        self.mqtt.max_queued_messages_set(0)
        self.mqtt.reconnect_delay_set(0.2, 2)
        self.mqtt.on_connect = lambda c, *_: c.subscribe(f"chat/v1/users/{self.user}/inbox", qos=1)
        self.mqtt.on_message = self._on_message
        self.mqtt.connect("127.0.0.1", self.port, keepalive=10)
        self.mqtt.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        event = orjson.loads(msg.payload)
        if event["type"] == "message-added":
            with self.lock:
                self.seen.add(event["data"]["message"]["message_id"])
        if event.get("request_id"):
            with self.answered:
                self.answers[event["request_id"]] = event
                self.answered.notify_all()

    def command(self, name: str, fields: dict[str, Any], request_id: str) -> paho.MQTTMessageInfo:
        payload = orjson.dumps({**fields, "request_id": request_id})
        return self.mqtt.publish(f"chat/v1/users/{self.user}/commands/{name}", payload, qos=1)

    def request(self, name: str, fields: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        rid = f"q{time.monotonic_ns()}"
        deadline = time.monotonic() + timeout
        while True:  # re-sent until answered: the bridge may be down or just killed
            self.command(name, fields, rid)
            with self.answered:
                self.answered.wait_for(lambda: rid in self.answers, min(3.0, deadline - time.monotonic()))
                if rid in self.answers:
                    return self.answers[rid]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.user}: {name} never answered")

    def send(self, cid: str, n: int) -> None:
        cmid = f"{self.user}-{n}"
        self.payloads[cmid] = orjson.dumps(
            {"conversation_id": cid, "body": f"{self.user} says {n}", "client_msg_id": cmid}
        )
        self.infos[cmid] = self.mqtt.publish(
            f"chat/v1/users/{self.user}/commands/send-message", self.payloads[cmid], qos=1
        )

    def resend_unacknowledged(self) -> int:
        again = [c for c, info in self.infos.items() if not acknowledged(info)]
        for cmid in again:
            self.infos[cmid] = self.mqtt.publish(
                f"chat/v1/users/{self.user}/commands/send-message", self.payloads[cmid], qos=1
            )
        return len(again)


class Services:
    """Mosquitto (persistent) and the bridge, each restartable."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.db = workdir / "chaos.sqlite3"
        (workdir / "mq").mkdir()
        conf = [
            ln
            for ln in (ROOT / "mosquitto/dev.conf").read_text().splitlines()
            if not ln.startswith(("listener ", "persistence", "user "))
        ]
        if os.geteuid() == 0:
            conf.insert(0, "user root")
        conf += [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {workdir}/mq/",
            "log_type information",
        ]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.broker: subprocess.Popen[str] | None = None
        self.bridge: subprocess.Popen[str] | None = None
        self.bridge_log = open(workdir / "bridge.log", "a")  # noqa: SIM115

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stderr=subprocess.PIPE, text=True)
        wait_for_line(self.broker, " running")

    def restart_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGTERM)  # saves its persistent sessions and queues
        self.broker.wait(30)
        self.start_broker()

    def start_bridge(self) -> None:
        self.bridge = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "serve",
                "--broker-url",
                f"mqtt://127.0.0.1:{self.port}",
                "--database-url",
                f"sqlite:///{self.db}",
                "--rate-limit",
                "0",
            ],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        wait_for_line(self.bridge, "bridge online")

    def kill_bridge(self) -> None:
        assert self.bridge is not None
        self.bridge.send_signal(signal.SIGKILL)
        self.bridge.wait(30)

    def stop(self) -> None:
        for proc in (self.bridge, self.broker):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def run(clients: int, messages: int, kills: int, rate: float) -> dict[str, int]:
    workdir = Path(tempfile.mkdtemp(prefix="chat-chaos-"))
    svc = Services(workdir)
    svc.start_broker()
    svc.start_bridge()
    users = [Client(f"u{i}", svc.port) for i in range(clients)]
    try:
        for c in users:
            c.request("connect", {"session_id": f"{c.user}-s"})
        convs = [
            c.request(
                "create-conversation", {"kind": "direct", "participants": [users[(i + 1) % clients].user]}
            )["data"]["conversation"]["conversation_id"]
            for i, c in enumerate(users)
        ]
        group = users[0].request(
            "create-conversation", {"kind": "group", "participants": [u.user for u in users[1:]]}
        )
        group_id = group["data"]["conversation"]["conversation_id"]
        members = {cid: {users[i].user, users[(i + 1) % clients].user} for i, cid in enumerate(convs)}
        members[group_id] = {u.user for u in users}

        duration = messages / rate
        events = sorted(
            [(duration * (k + 1) / (kills + 1), "kill") for k in range(kills)] + [(duration * 0.55, "broker")]
        )
        chaos_log: list[str] = []

        def chaos() -> None:
            start = time.monotonic()
            for at, what in events:
                time.sleep(max(0.0, start + at - time.monotonic()))
                if what == "kill":
                    svc.kill_bridge()
                    chaos_log.append(f"{time.monotonic() - start:5.1f}s SIGKILL bridge")
                    svc.start_bridge()
                else:
                    svc.restart_broker()
                    chaos_log.append(f"{time.monotonic() - start:5.1f}s broker restarted")

        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        next_at = time.monotonic()
        for n in range(messages):
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
            for i, c in enumerate(users):
                c.send(group_id if n % 3 == 0 else convs[i], n)
        chaos_thread.join()

        # Clients re-send what the broker never acknowledged (same client_msg_id) until it has everything.
        resent = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pending = [c.resend_unacknowledged() for c in users]
            if not any(pending):
                break
            resent += sum(pending)
            time.sleep(1)
        expected = clients * messages
        with sqlite3.connect(svc.db) as db:
            while time.monotonic() < deadline:
                stored_count = db.execute(
                    "select count(*) from messages where client_msg_id is not null"
                ).fetchone()[0]
                if stored_count >= expected:
                    break
                time.sleep(0.5)
            rows = db.execute(
                "select conversation_id, seq, message_id, sender_id, client_msg_id from messages"
            ).fetchall()
        twice = len(rows) - len({(r[0], r[3], r[4]) for r in rows})
        gaps = 0
        for _cid, seqs in itertools.groupby(sorted((r[0], r[1]) for r in rows), key=lambda r: r[0]):
            got = [s for _, s in seqs]
            gaps += len(set(range(1, max(got) + 1)) - set(got))
        by_conv: dict[str, set[str]] = {}
        for r in rows:
            by_conv.setdefault(r[0], set()).add(r[2])
        never_seen = 0
        live = 0
        for c in users:
            for cid, ids in by_conv.items():
                if c.user not in members.get(cid, set()):
                    continue
                fetched: set[str] = set()
                since = 0
                while True:
                    page = c.request(
                        "get-messages", {"conversation_id": cid, "since_seq": since, "limit": 500}
                    )
                    if page.get("type") == "error" and page["data"].get("retry_after") is not None:
                        time.sleep(page["data"]["retry_after"])  # pages cost what they read: paced
                        continue
                    fetched |= {m["message_id"] for m in page["data"]["messages"]}
                    if not page["data"]["has_more"]:
                        break
                    since = page["data"]["messages"][-1]["seq"]
                with c.lock:
                    live += len(ids & c.seen)
                    never_seen += len(ids - c.seen - fetched)
        acked = sum(1 for c in users for info in c.infos.values() if acknowledged(info))
        result = {
            "clients": clients,
            "messages_each": messages,
            "bridge_kills": kills,
            "broker_restarts": 1,
            "sent": expected,
            "acknowledged": acked,
            "stored": len(rows),
            "resent_by_clients": resent,
            "stored_twice": twice,
            "seq_gaps": gaps,
            "never_seen": never_seen,
            "seen_live": live,
        }
        print("\n".join(chaos_log))
        return result
    finally:
        for c in users:
            c.mqtt.loop_stop()
        svc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200, help="per client")
    parser.add_argument("--kills", type=int, default=4, help="times the bridge is SIGKILLed")
    parser.add_argument("--rate", type=float, default=20, help="messages per second per client")
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args.clients, args.messages, args.kills, args.rate)
    for key, value in result.items():
        print(f"{key:18} {value}")
    print(f"took {time.monotonic() - started:.0f}s")
    bad = result["stored_twice"] + result["seq_gaps"] + result["never_seen"]
    ok = bad == 0 and result["stored"] == result["sent"] == result["acknowledged"]
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
