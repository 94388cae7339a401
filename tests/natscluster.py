"""NATS servers for the tests: one node or a cluster of three on loopback, on free ports, with the
chat account written by bridge/natsconf.py (the same text as the shipped nats/ configuration)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

from bridge import natsconf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_available() -> bool:
    return shutil.which("nats-server") is not None


class NatsNode:
    def __init__(self, workdir: Path, name: str, conf: str, client_port: int, mqtt_port: int) -> None:
        self.name = name
        self.client_port = client_port
        self.mqtt_port = mqtt_port
        self.conf = workdir / f"{name}.conf"
        self.conf.write_text(conf)
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20) -> NatsNode:
        self.proc = subprocess.Popen(
            ["nats-server", "-c", str(self.conf)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        ready = threading.Event()

        def read_log() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if "Server is ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"nats-server {self.name} did not start: {''.join(self.log[-20:])}")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsCluster:
    """`size` nodes (1, or 3 routed together) sharing the chat account and these accounts
    (user id -> password)."""

    def __init__(self, workdir: Path, accounts: dict[str, str], size: int = 3, partitions: int = 16) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.partitions = partitions
        (workdir / "chat.conf").write_text(natsconf.account_conf("chat/v1", partitions))
        hashed = {u: natsconf.bcrypt_hash(p) for u, p in accounts.items()}
        (workdir / "users.conf").write_text(natsconf.users_conf(hashed))
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsNode] = []
        for i in range(size):
            client, mqtt = free_port(), free_port()
            routes = [f"nats-route://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i]
            conf = natsconf.node_conf(
                f"n{i + 1}",
                client=f"127.0.0.1:{client}",
                mqtt=f"127.0.0.1:{mqtt}",
                store_dir=str(workdir / f"js-n{i + 1}"),
                cluster=f"127.0.0.1:{cluster_ports[i]}" if size > 1 else None,
                routes=routes,
            )
            self.nodes.append(NatsNode(workdir, f"n{i + 1}", conf, client, mqtt))

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self) -> NatsCluster:
        threads = [threading.Thread(target=n.start) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                raise RuntimeError(f"nats-server {n.name} did not start: {''.join(n.log[-20:])}")
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
