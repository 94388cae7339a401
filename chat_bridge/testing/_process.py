"""`chat-bridge serve` as a child process, ready when its retained bridge/status says online."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ..client import Client


class BridgeStartError(RuntimeError):
    """The bridge exited or did not come online in time (the message carries its output)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_online(
    host: str,
    port: int,
    *,
    prefix: str = "chat/v1",
    not_epoch: str | None = None,
    timeout: float = 30,
    username: str | None = None,
    password: str | None = None,
) -> str:
    """Waits until the bridge's retained status is online with an epoch other than `not_epoch`;
    returns the epoch. Raises TimeoutError."""
    online = threading.Event()
    epoch: list[str] = []
    # a client id of the account it uses (the client id rule), or of nobody's where it is anonymous
    client_id = f"{username or 'chat-probe'}:probe-{secrets.token_hex(6)}"
    mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if username is not None:
        mqtt.username_pw_set(username, password)

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe(f"{prefix}/bridge/status", 1)

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            status = json.loads(msg.payload)
            if status.get("status") == "online" and status.get("epoch") not in (None, not_epoch):
                epoch.append(status["epoch"])
                online.set()

    mqtt.on_connect = on_connect
    mqtt.on_message = on_message
    deadline = time.monotonic() + timeout
    try:
        while True:  # the broker itself may not be listening yet
            try:
                mqtt.connect(host, port, keepalive=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no MQTT broker on {host}:{port}") from None
                time.sleep(0.1)
        mqtt.loop_start()
        if not online.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the bridge on {host}:{port} did not come online within {timeout:g} s")
        return epoch[0]
    finally:
        mqtt.loop_stop()
        mqtt.disconnect()


class _StatusWatch:
    """A subscription to `{prefix}/bridge/status`, made before a bridge starts on a broker that is
    already running: what was retained there then (another bridge's status, or a stopped one's), and
    the statuses published after it."""

    def __init__(
        self, host: str, port: int, *, prefix: str, username: str | None, password: str | None
    ) -> None:
        self.host, self.port, self.topic = host, port, f"{prefix}/bridge/status"
        self.retained: dict[str, Any] | None = None
        self._statuses: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._settled = threading.Event()  # everything retained at subscription time has arrived
        self._refused: str | None = None
        client_id = f"{username or 'chat-probe'}:probe-{secrets.token_hex(6)}"
        self._mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            self._mqtt.username_pw_set(username, password)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_unsubscribe = lambda *_: self._settled.set()
        self._mqtt.on_message = self._on_message

    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            self._settled.set()
            return
        c.subscribe(self.topic, 1)
        # the broker answers in order: once this UNSUBACK is in, the retained status came before it
        c.unsubscribe(f"{self.topic}/probe-{secrets.token_hex(6)}")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            status = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        with self._changed:
            if msg.retain and not self._settled.is_set() and self.retained is None:
                self.retained = status
            self._statuses.append(status)
            self._changed.notify_all()

    def open(self, timeout: float) -> _StatusWatch:
        """Connects and subscribes; returns once what was retained has arrived. Raises TimeoutError."""
        try:
            self._mqtt.connect(self.host, self.port, keepalive=10)
        except OSError as exc:
            raise TimeoutError(f"no MQTT broker on {self.host}:{self.port} ({exc})") from None
        self._mqtt.loop_start()
        if not self._settled.wait(timeout):
            self.close()
            raise TimeoutError(f"the broker on {self.host}:{self.port} did not answer a subscription")
        if self._refused is not None:
            self.close()
            raise TimeoutError(
                f"the broker on {self.host}:{self.port} refused the connection ({self._refused})"
            )
        return self

    def wait_online(self, not_epochs: set[str | None], timeout: float) -> str | None:
        """The epoch of the first status online with an epoch not in `not_epochs`, or None in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for status in self._statuses:
                    if status.get("status") == "online" and status.get("epoch") not in not_epochs:
                        return str(status["epoch"])
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def close(self) -> None:
        self._mqtt.loop_stop()
        self._mqtt.disconnect()


@functools.cache
def _serve_options() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--help"], capture_output=True, text=True, check=False
    )
    return out.stdout


class BridgeProcess:
    """`chat-bridge serve` in a child process.

    Without `broker_url` it runs the embedded broker on a free loopback port (`port`), which also
    serves MQTT over WebSockets on another (`ws_port`, `ws_url`: ws://127.0.0.1:PORT/mqtt); with one,
    it uses that broker and clients connect there (`ws_port` and `ws_url` are None). The database is a
    SQLite file in `workdir` unless `database_url` is given. Its HTTP server is off unless
    `extra_args` turn it on. `client(user)` makes SDK clients for it; `restart()` stops it and starts
    it again on the same ports and database.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        broker_url: str | None = None,
        database_url: str | None = None,
        prefix: str = "chat/v1",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker_url = broker_url
        self.database_url = database_url or f"sqlite:///{self.workdir / 'chat-bridge.sqlite3'}"
        self.prefix = prefix
        self.extra_args = extra_args
        self._probe: tuple[str | None, str | None] = (None, None)
        if broker_url:
            parts = urlsplit(broker_url)
            self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
            # readiness is read with the bridge's own account, where the broker has accounts
            self._probe = (
                unquote(parts.username) if parts.username else None,
                unquote(parts.password) if parts.password else None,
            )
        else:
            self.host, self.port = "127.0.0.1", free_port()
        self.ws_port: int | None = None
        if not broker_url and "--ws-listen" not in extra_args and "--ws-listen" in _serve_options():
            self.ws_port = free_port()
        elif "--ws-listen" in extra_args:
            given = extra_args[extra_args.index("--ws-listen") + 1 :][:1]
            if given and given[0].rpartition(":")[2].isdigit():
                self.ws_port = int(given[0].rpartition(":")[2])
        self.epoch: str | None = None
        self.log_path = self.workdir / "chat-bridge.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "bridge", "serve", "--database-url", self.database_url]
        cmd += ["--topic-prefix", self.prefix]
        if self.broker_url:
            cmd += ["--broker-url", self.broker_url]
        else:
            cmd += ["--listen", f"{self.host}:{self.port}"]
        if self.ws_port is not None and "--ws-listen" not in self.extra_args:
            cmd += ["--ws-listen", f"{self.host}:{self.ws_port}"]
        if "--http-listen" in _serve_options() and "--http-listen" not in self.extra_args:
            cmd += ["--http-listen", "off"]  # its default port would collide
        return [*cmd, *self.extra_args]

    @property
    def ws_url(self) -> str | None:
        """Where MQTT-over-WebSockets clients connect (subprotocol `mqtt`), None without a listener."""
        return None if self.ws_port is None else f"ws://{self.host}:{self.ws_port}/mqtt"

    def start(self, timeout: float = 30) -> BridgeProcess:
        if self.broker_url:
            return self._start_on_broker(timeout)
        self._spawn()
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise BridgeStartError(f"chat-bridge serve exited ({self._proc.returncode}):\n{self.log()}")
            try:
                self.epoch = wait_online(
                    self.host,
                    self.port,
                    prefix=self.prefix,
                    not_epoch=self.epoch,
                    timeout=min(2.0, timeout),
                    username=self._probe[0],
                    password=self._probe[1],
                )
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BridgeStartError(f"chat-bridge serve did not come online:\n{self.log()}") from None

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_BRIDGE_")}
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def _start_on_broker(self, timeout: float) -> BridgeProcess:
        """On a broker that is already running, the bridge is ready when `bridge/status` shows an
        epoch of its own: neither the one retained there before it started nor its previous one.
        Another bridge online under the same prefix would take the same commands: refused."""
        deadline = time.monotonic() + timeout
        try:
            watch = _StatusWatch(
                self.host, self.port, prefix=self.prefix, username=self._probe[0], password=self._probe[1]
            ).open(timeout)
        except TimeoutError as exc:
            raise BridgeStartError(f"chat-bridge serve not started: {exc}") from None
        try:
            before = watch.retained or {}
            if before.get("status") == "online" and before.get("epoch") != self.epoch:
                raise BridgeStartError(
                    f"another chat-bridge is online on {self.host}:{self.port} under the topic prefix "
                    f"{self.prefix!r} (epoch {before.get('epoch')}): it would take the test bridge's "
                    "commands too. Stop it, or give the tests a prefix of their own "
                    "(--chat-bridge-topic-prefix, or BridgeProcess(prefix=...))"
                )
            self._spawn()
            assert self._proc is not None
            not_epochs = {self.epoch, before.get("epoch")}
            while True:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    raise BridgeStartError(f"chat-bridge serve exited ({code}):\n{self.log()}")
                epoch = watch.wait_online(not_epochs, min(0.5, max(0.0, deadline - time.monotonic())))
                if epoch is not None:
                    self.epoch = epoch
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise BridgeStartError(f"chat-bridge serve did not come online:\n{self.log()}")
        finally:
            watch.close()

    def stop(self, timeout: float = 15) -> None:
        """A graceful stop (SIGTERM), killed if it takes longer than `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """A crash: SIGKILL, no goodbye."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def restart(self, timeout: float = 30) -> BridgeProcess:
        self.stop()
        return self.start(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, user: str, **options: Any) -> Client:
        """An SDK client for this bridge (not connected yet: `connect()` or `with`); over WebSockets
        (`ws_port`) with `transport="websockets"`."""
        options.setdefault("prefix", self.prefix)
        port = self.port
        if options.get("transport") == "websockets":
            if self.ws_port is None:
                raise ValueError("this bridge serves no WebSockets (`--ws-listen off` or an external broker)")
            port = self.ws_port
        return Client(user, self.host, port, **options)

    def __enter__(self) -> BridgeProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
