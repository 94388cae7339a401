"""The project's bridge image with Mosquitto and PostgreSQL, for containerized integration tests.

    from chat_bridge.testing.containers import ChatBridgeContainer

    with ChatBridgeContainer() as stack, stack.client("alice") as alice:
        alice.send_message("global", "hello from a test")

Needs `testcontainers` (the `testing` extra) and a Docker-compatible engine (`DOCKER_HOST`).
The images are the project's: `Dockerfile` (the bridge) and `docker/mosquitto.Dockerfile`;
`build_images()` builds them from a checkout, or pass the names of images you built or pulled.
The Mosquitto of the stack is anonymous (a test broker, not the production config).
"""

from __future__ import annotations

import contextlib
import importlib
import time
import uuid
from pathlib import Path
from typing import Any

from ..client import Client
from ._process import wait_online

BRIDGE_IMAGE = "chat-bridge:latest"
MOSQUITTO_IMAGE = "chat-bridge-mosquitto:latest"
POSTGRES_IMAGE = "postgres:16"
# listener on every interface of the container, anonymous, nothing kept
MOSQUITTO_CONF = "listener 1883 0.0.0.0\\nallow_anonymous true\\npersistence false\\nlog_dest stdout\\n"


def _docker() -> Any:
    # the Docker SDK (a dependency of testcontainers), imported by name: a checkout's docker/ folder
    # would shadow it for type checkers
    importlib.import_module("docker.errors")
    return importlib.import_module("docker")


class ContainerStartError(RuntimeError):
    """A container of the stack did not come up (the message carries its logs)."""


def build_images(
    context: Path | str, bridge_image: str = BRIDGE_IMAGE, mosquitto_image: str = MOSQUITTO_IMAGE
) -> None:
    """Builds the bridge and Mosquitto images from a checkout of the project (slow the first time)."""
    client = _docker().from_env()
    try:
        for dockerfile, tag in (
            ("Dockerfile", bridge_image),
            ("docker/mosquitto.Dockerfile", mosquitto_image),
        ):
            client.images.build(path=str(context), dockerfile=dockerfile, tag=tag, rm=True)
    finally:
        client.close()


def image_exists(name: str) -> bool:
    docker = _docker()
    client = docker.from_env()
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


class ChatBridgeContainer:
    """PostgreSQL, Mosquitto and the bridge, on a network of their own; Mosquitto's port is mapped.

    `mqtt_host`/`mqtt_port` is where clients connect; `client(user)` makes SDK clients for it;
    `database_url` is the bridge's (inside the network); `restart_bridge()` restarts only the bridge.
    """

    def __init__(
        self,
        bridge_image: str = BRIDGE_IMAGE,
        mosquitto_image: str = MOSQUITTO_IMAGE,
        postgres_image: str = POSTGRES_IMAGE,
        *,
        prefix: str = "chat/v1",
        startup_timeout: float = 90,
    ) -> None:
        self.bridge_image, self.mosquitto_image, self.postgres_image = (
            bridge_image,
            mosquitto_image,
            postgres_image,
        )
        self.prefix = prefix
        self.startup_timeout = startup_timeout
        self.database_url = "postgresql+psycopg://chat:chat@postgres:5432/chat"
        self.epoch: str | None = None
        self._network: Any = None
        self._containers: dict[str, Any] = {}

    @property
    def mqtt_host(self) -> str:
        return str(self._containers["mosquitto"].get_container_host_ip())

    @property
    def mqtt_port(self) -> int:
        return int(self._containers["mosquitto"].get_exposed_port(1883))

    def start(self) -> ChatBridgeContainer:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        for image in (self.bridge_image, self.mosquitto_image):
            # a name of no repository (the project's own tags) can only be an image built here
            if "/" not in image and not image_exists(image):
                raise ContainerStartError(
                    f"the image {image} is not there: build the project's images once from a checkout, "
                    "`chat_bridge.testing.containers.build_images('path/to/chat-bridge')`, "
                    "or pass the names of images you built or pulled"
                )
        try:
            self._network = Network().create()
            postgres = (
                DockerContainer(self.postgres_image)
                .with_envs(POSTGRES_USER="chat", POSTGRES_PASSWORD="chat", POSTGRES_DB="chat")
                .with_network(self._network)
                .with_network_aliases("postgres")
            )
            self._containers["postgres"] = postgres.start()
            mosquitto = (
                DockerContainer(self.mosquitto_image)
                .with_command(
                    ["sh", "-c", f"printf '{MOSQUITTO_CONF}' > /tmp/m.conf && exec mosquitto -c /tmp/m.conf"]
                )
                .with_exposed_ports(1883)
                .with_network(self._network)
                .with_network_aliases("mosquitto")
            )
            self._containers["mosquitto"] = mosquitto.start()
            self._wait_postgres()
            self._start_bridge()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_postgres(self) -> None:
        # by TCP: the official entrypoint's first, temporary server listens on its socket only
        deadline = time.monotonic() + self.startup_timeout
        postgres = self._containers["postgres"]
        while postgres.exec(["pg_isready", "-h", "127.0.0.1", "-U", "chat", "-d", "chat"]).exit_code != 0:
            if time.monotonic() > deadline:
                raise ContainerStartError(f"PostgreSQL did not come up:\n{self.logs('postgres')}")
            time.sleep(0.5)

    def _start_bridge(self) -> None:
        from testcontainers.core.container import DockerContainer

        bridge = (
            DockerContainer(self.bridge_image)
            .with_envs(
                CHAT_BRIDGE_BROKER_URL="mqtt://mosquitto:1883",
                CHAT_BRIDGE_DATABASE_URL=self.database_url,
                CHAT_BRIDGE_TOPIC_PREFIX=self.prefix,
            )
            .with_command(["serve"])
            .with_network(self._network)
            .with_name(f"chat-bridge-{uuid.uuid4().hex[:8]}")
        )
        self._containers["bridge"] = bridge.start()
        try:
            self.epoch = wait_online(
                self.mqtt_host,
                self.mqtt_port,
                prefix=self.prefix,
                not_epoch=self.epoch,
                timeout=self.startup_timeout,
            )
        except TimeoutError:
            raise ContainerStartError(f"the bridge did not come online:\n{self.logs('bridge')}") from None

    def restart_bridge(self) -> None:
        """Stops the bridge container (gracefully) and starts a new one on the same database."""
        bridge = self._containers.pop("bridge")
        bridge.get_wrapped_container().stop(timeout=15)
        bridge.stop()
        self._start_bridge()

    def logs(self, name: str = "bridge") -> str:
        container = self._containers.get(name)
        if container is None:
            return ""
        out, err = container.get_logs()
        return bytes(out + err).decode(errors="replace")

    def client(self, user: str, **options: Any) -> Client:
        """An SDK client connected to the stack's Mosquitto (not connected yet: `connect()` or `with`)."""
        options.setdefault("prefix", self.prefix)
        return Client(user, self.mqtt_host, self.mqtt_port, **options)

    def stop(self) -> None:
        for name in ("bridge", "mosquitto", "postgres"):
            container = self._containers.pop(name, None)
            if container is not None:
                with contextlib.suppress(Exception):  # already gone: nothing left to clean
                    container.stop()
        if self._network is not None:
            with contextlib.suppress(Exception):
                self._network.remove()
            self._network = None

    def __enter__(self) -> ChatBridgeContainer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
