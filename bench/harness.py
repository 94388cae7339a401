"""Shared by the benchmarks: a Mosquitto on a free port, the bridge as a subprocess, latency figures."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(
    workdir: Path, conf: Path = ROOT / "mosquitto" / "dev.conf", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], int]:
    """Mosquitto with `conf` on a free port; `extra` lines replace the config's lines of the same option."""
    port = free_port()
    overridden = tuple(line.split()[0] + " " for line in extra)
    lines = [
        ln for ln in conf.read_text().splitlines() if not ln.startswith(("listener ", "user ", *overridden))
    ]
    lines += list(extra)
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    path = workdir / "mosquitto.conf"
    path.write_text(f"listener {port} 127.0.0.1\n" + "\n".join(lines) + "\nlog_type information\n")
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(proc, " running")
    return proc, port


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    found = threading.Event()
    stream = proc.stderr if proc.stderr is not None else proc.stdout
    assert stream is not None

    def read() -> None:
        for line in stream:
            if text in line:
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or proc.poll() is not None:
        raise RuntimeError(f"process never printed {text!r}")


def _serve(*args: str) -> subprocess.Popen[str]:
    """`chat-bridge serve ARGS`, once it says it is online."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    wait_for_line(proc, "bridge online")
    return proc


def start_bridge(port: int, database_url: str | None = None, *extra: str) -> subprocess.Popen[str]:
    db = database_url or f"sqlite:///{tempfile.mkdtemp(prefix='chat-bench-')}/bench.sqlite3"
    return _serve("--broker-url", f"mqtt://127.0.0.1:{port}", "--database-url", db, *extra)


def start_embedded(database_url: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """`chat-bridge serve` with its embedded amqtt broker on a free port; (process, port)."""
    port = free_port()
    ws = () if "--ws-listen" in extra else ("--ws-listen", "off")  # 127.0.0.1:9001 may be taken
    return _serve("--listen", f"127.0.0.1:{port}", "--database-url", database_url, *ws, *extra), port


def _no_delay(_c: object, _u: object, sock: object) -> None:
    """paho leaves Nagle on: a client that acknowledges a delivery and then publishes would wait
    up to 40 ms on its own socket, and that would be measured as the bridge's latency."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client(
    cid: str,
    port: int,
    topics: Sequence[str] = (),
    on_message: Callable[..., None] | None = None,
) -> paho.Client:
    """A connected paho client (TCP_NODELAY), subscribed at QoS 1 to `topics` once this returns."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    c.on_socket_open = _no_delay
    if on_message is not None:
        c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if topics:
        c.subscribe([(t, 1) for t in topics])
        if not subscribed.wait(10):
            raise RuntimeError(f"{cid}: no SUBACK")
    return c


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


AMQTT = """
import asyncio, sys
from bridge.broker import start_broker

async def main() -> None:
    broker = await start_broker("127.0.0.1", int(sys.argv[1]), topic_rules=False)
    print("amqtt listening", file=sys.stderr, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_amqtt() -> tuple[subprocess.Popen[str], int]:
    """The embedded broker's amqtt alone, in a process of its own without topic rules (a plain broker
    for a raw relay beside the bridge's embedded mode); (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", AMQTT, str(port)], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    wait_for_line(proc, "amqtt listening")
    return proc, port
