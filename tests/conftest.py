"""Shared fixtures: a real Mosquitto on a free port, scratch PostgreSQL databases,
the embedded broker in a thread, and the bridge running in-process."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Bridges that tests start as `chat-bridge serve` run no HTTP server unless a test asks for one on a
# free port: the default 127.0.0.1:8080 would be shared by every test (and every suite) running at once.
os.environ["CHAT_BRIDGE_HTTP_LISTEN"] = "off"
os.environ["CHAT_BRIDGE_WS_LISTEN"] = "off"  # likewise the WebSockets listener's 127.0.0.1:9001

PG_ADMIN_URL = os.environ.get("CHAT_BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module", autouse=True)
def one_docker_module_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist (scripts/test), the modules with tests marked docker take turns: they build
    and start the project's images, and two builds of one image at once would only slow both."""
    docker = any(
        item.get_closest_marker("docker") for item in request.session.items if item.module is request.module
    )
    if not docker or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    with (tmp_path_factory.getbasetemp().parent / "docker.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after the module's teardown
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """`mosquitto` from its binary with one of the project's configs, on free ports.

    Listener lines get free loopback ports; `password_file`, `acl_file` and
    `persistence_location` can be pointed elsewhere.
    """

    def __init__(
        self,
        workdir: Path,
        conf: Path = ROOT / "mosquitto" / "dev.conf",
        replace: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.ws_port = free_port()
        replace = replace or {}
        out = []
        for line in conf.read_text().splitlines():
            key = line.split(" ", 1)[0]
            if line.startswith("listener "):
                ws = line.split()[1] == "9001"
                out.append(f"listener {self.ws_port if ws else self.port} 127.0.0.1")
            elif key in replace:
                out.append(f"{key} {replace[key]}")
            elif key != "user":
                out.append(line)
        # a replaced key the config does not name (e.g. persistence_location in dev.conf) is added
        named = {line.split(" ", 1)[0] for line in conf.read_text().splitlines()}
        out.extend(f"{key} {value}" for key, value in replace.items() if key not in named)
        out.extend(extra)
        if os.geteuid() == 0:
            out.insert(
                0, "user root"
            )  # as root, Mosquitto would switch to `mosquitto`, who cannot read tmp files
        # `information` logs the "running" line that tells us it listens.
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(out) + "\nlog_type information\n")
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stderr=subprocess.PIPE, text=True, cwd=self.cwd
        )
        running = threading.Event()

        def read_log() -> None:  # keeps the pipe drained and tells us when it listens
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if " running" in line:
                    running.set()
            running.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not running.wait(10) or self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto did not start: {''.join(self.log)}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


FLOOD_GUARD = ROOT / "mosquitto" / "plugins" / "chat_flood_guard.so"


def flood_guard() -> Path:
    """The Mosquitto flood-guard plugin that mosquitto.conf loads, built if missing (as scripts/test does)."""
    if (
        not FLOOD_GUARD.exists()
        or FLOOD_GUARD.stat().st_mtime < FLOOD_GUARD.with_name("flood_guard.c").stat().st_mtime
    ):
        subprocess.run(["bash", str(ROOT / "scripts" / "build-flood-guard")], check=True)
    return FLOOD_GUARD


ACCOUNTS = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "mallory": "mallory-pw",
    "chat-bridge": "bridge-pw",
    "chat-observer": "observer-pw",
    "chat-push": "push-pw",
}


def write_accounts(path: Path) -> Path:
    from bridge import passwords

    passwords.write(path, {user: passwords.hash_password(pw) for user, pw in ACCOUNTS.items()})
    return path


@pytest.fixture
def secure_mosquitto(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    """Mosquitto with the shipped production config (accounts, ACL, websockets, persistence)."""
    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    password_file = write_accounts(tmp_path / "passwd")
    guard = flood_guard()
    data = tmp_path / "data"
    data.mkdir()
    broker = Mosquitto(
        tmp_path,
        ROOT / "mosquitto" / "mosquitto.conf",
        {
            "plugin_opt_password_file": str(password_file),
            "acl_file": str(ROOT / "mosquitto" / "acl"),
            "persistence_location": f"{data}/",
            "plugin": str(guard),
        },
    ).start()
    yield broker, password_file
    broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:
        return (
            f"no PostgreSQL reachable at {PG_ADMIN_URL} ({type(exc).__name__}); set CHAT_BRIDGE_TEST_POSTGRES"
        )


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new empty database, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg

    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    name = f"chat_bridge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with scratch_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chat.sqlite3'}"
    else:
        with scratch_postgres() as url:
            yield url


# The bridge's credentials on each running embedded broker's port (its client id needs them, with
# accounts and without): `running_bridge` uses them when none are given.
BRIDGE_CREDENTIALS: dict[int, str] = {}


class EmbeddedBroker:
    """The embedded amqtt broker, in a thread with its own event loop."""

    def __init__(
        self, security: object = None, guard: tuple[float, int] | None = None, **options: object
    ) -> None:
        self.security = security
        self.guard = guard
        self.options = options
        self.secret = getattr(security, "internal_secret", None) or "bridge-secret"
        self.port = free_port()
        BRIDGE_CREDENTIALS[self.port] = f"chat-bridge:{self.secret}"
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from bridge.broker import start_broker

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            broker = await start_broker(
                "127.0.0.1",
                self.port,
                self.security,  # type: ignore[arg-type]
                guard=self.guard,
                bridge_secret=self.secret,
                **self.options,  # type: ignore[arg-type]
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.broker = broker
        self._ready.set()
        await self._stop.wait()
        await broker.shutdown()

    def start(self) -> EmbeddedBroker:
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def publisher(self) -> object:
        """What `chat-bridge serve` gives the bridge with its embedded broker: events in-process."""
        from bridge.broker import InProcessPublisher

        assert self._loop is not None
        return InProcessPublisher(self.broker, self._loop)

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        BRIDGE_CREDENTIALS.pop(self.port, None)


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


@contextmanager
def running_bridge(
    port: int, database_url: str, credentials: str = "", publisher: object = None, **settings: object
) -> Iterator[object]:
    """The bridge, in this process, against the broker on `port`; ready when its status is online."""
    from bridge.cli import build_bridge
    from bridge.config import Settings

    credentials = credentials or BRIDGE_CREDENTIALS.get(port, "")
    url = f"mqtt://{credentials + '@' if credentials else ''}127.0.0.1:{port}"
    settings.setdefault("rate_limit", 0)  # bursts in tests are deliberate; the limit has tests of its own
    settings.setdefault("cost_limit", 0)  # likewise the cost budget
    config = Settings(broker_url=url, database_url=database_url, **settings)  # type: ignore[arg-type]
    bridge = build_bridge(config, publisher=publisher)  # type: ignore[arg-type]
    bridge.start()
    try:
        if not bridge.ready.wait(15):
            raise TimeoutError("the bridge did not come online")
        yield bridge
    finally:
        bridge.stop()
