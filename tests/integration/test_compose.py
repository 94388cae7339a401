"""docker-compose.yml: what can be checked without a Docker engine, and a real run where one exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from chatclient import ChatClient
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_ports_volumes_and_healthchecks() -> None:
    doc = compose()
    services = {n: s for n, s in doc["services"].items() if "cluster" not in s.get("profiles", [])}
    assert set(services) == {"mosquitto", "postgres", "bridge"}
    assert {"${CHAT_MQTT_PORT:-1883}:1883", "${CHAT_WS_PORT:-9001}:9001"} <= set(
        services["mosquitto"]["ports"]
    )
    assert services["bridge"]["ports"] == ["127.0.0.1:${CHAT_HTTP_PORT:-8080}:8080"]
    for name in services:
        assert services[name]["healthcheck"]["test"], name
    assert {"accounts", "mosquitto-data", "postgres-data"} <= set(doc["volumes"])
    depends = services["bridge"]["depends_on"]
    assert depends == {
        "mosquitto": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }


def test_the_cluster_profile_wires_three_nats_nodes_and_workers_to_one_account_volume() -> None:
    from bridge import natsconf

    services = compose()["services"]
    cluster = {n for n, s in services.items() if s.get("profiles") == ["cluster"]}
    assert cluster == {"cluster-init", "nats-1", "nats-2", "nats-3", "worker-1", "worker-2"}
    shipped = natsconf.compose(ROOT / "nats" / "compose")
    for i in (1, 2, 3):
        node = services[f"nats-{i}"]
        assert node["command"] == ["-c", f"/etc/nats/nats-{i}.conf"]
        assert "nats-accounts:/etc/nats/accounts:ro" in node["volumes"]
        text = (ROOT / f"nats/compose/nats-{i}.conf").read_text()
        assert text == shipped[ROOT / f"nats/compose/nats-{i}.conf"]
        assert all(f"nats-route://nats-{j}:6222" in text for j in (1, 2, 3) if j != i)
    assert 'include "accounts/users.conf"' in (ROOT / "nats/compose/chat.conf").read_text()
    assert "COPY nats/compose/ /etc/nats/" in (ROOT / "docker/nats.Dockerfile").read_text()
    for w in ("worker-1", "worker-2"):
        assert services[w]["entrypoint"] == ["chat-bridge-cluster-worker"]
        assert "nats-accounts:/accounts:ro" in services[w]["volumes"]
    assert "nats-accounts:/accounts" in services["cluster-init"]["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "docker/cluster-worker.sh" in dockerfile and "docker/cluster-init.sh" in dockerfile


def test_mosquitto_mounts_match_the_shipped_config() -> None:
    """The config names paths relative to the working directory (/ in the image): each must be mounted."""
    mounts = {}
    for volume in compose()["services"]["mosquitto"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./mosquitto/mosquitto.conf"
    conf = dict(
        line.split(" ", 1)
        for line in (ROOT / "mosquitto/mosquitto.conf").read_text().splitlines()
        if line and not line.startswith("#") and " " in line
    )
    for key in ("acl_file", "persistence_location"):
        path = "/" + conf[key].rstrip("/")
        assert path in mounts or any(path.startswith(t) for t in mounts), (key, path)
        if key != "persistence_location":
            assert (ROOT / mounts[path].removeprefix("./")).name == Path(conf[key]).name
    assert (ROOT / "mosquitto/acl").exists()
    # The password file is in the accounts volume (a directory: a rewrite is seen at once), which the
    # image links to from where the shipped config names it; no single file is bind-mounted.
    assert conf["plugin_opt_password_file"] == "mosquitto/passwd"
    assert mounts["/mosquitto/accounts"] == "accounts"
    assert "ln -s accounts/passwd /mosquitto/passwd" in (ROOT / "docker/mosquitto.Dockerfile").read_text()
    assert "./mosquitto/passwd" not in mounts.values()


def test_bridge_environment_matches_the_acl_and_the_database() -> None:
    env = compose()["services"]["bridge"]["environment"]
    assert env["CHAT_BROKER_HOST"] == "mosquitto:1883" and env["CHAT_ACCOUNTS"] == "/accounts/passwd"
    assert "BRIDGE_PASSWORD" not in (ROOT / "docker-compose.yml").read_text()  # nothing to export
    assert "user chat-bridge" in (ROOT / "mosquitto/acl").read_text()
    assert env["CHAT_BRIDGE_DATABASE_URL"].startswith("postgresql+psycopg://chat:")
    assert env["CHAT_BRIDGE_DATABASE_URL"].endswith("@postgres:5432/chat")
    pg = compose()["services"]["postgres"]["environment"]
    assert (pg["POSTGRES_USER"], pg["POSTGRES_DB"]) == ("chat", "chat")
    assert env["CHAT_BRIDGE_TOPIC_PREFIX"] in (ROOT / "mosquitto/acl").read_text()


def test_mosquitto_image_builds_the_flood_guard_where_the_config_loads_it() -> None:
    build = compose()["services"]["mosquitto"]["build"]
    text = (ROOT / build["dockerfile"]).read_text()
    plugin = next(
        line.split(" ", 1)[1]
        for line in (ROOT / "mosquitto/mosquitto.conf").read_text().splitlines()
        if line.startswith("plugin ")
    )
    assert "COPY mosquitto/plugins/flood_guard.c" in text
    assert f"/{plugin}" in text  # the config's relative path, from the image's working directory /
    assert "WORKDIR /" in text and "/mosquitto/config/mosquitto.conf" in text


def test_dockerfile_installs_the_package_and_the_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and 'ENTRYPOINT ["chat-bridge-entrypoint"]' in text
    assert (
        "--uid 10001" in text
        and "usermod -u 10001 mosquitto" in (ROOT / "docker/mosquitto.Dockerfile").read_text()
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "mosquitto/passwd"} <= set(ignored)
    assert (ROOT / "docker/healthcheck.py").exists() and "docker/healthcheck.py" in text
    compile((ROOT / "docker/healthcheck.py").read_text(), "healthcheck.py", "exec")


CONTAINERS = ROOT.parent / "shared" / "tools" / "containers"


def docker_engine() -> str | None:
    """None when `docker compose` can run containers here, otherwise why not."""
    if not shutil.which("docker"):
        return f"no docker client installed (on a machine prepared by {CONTAINERS.name} setup there is one)"
    if not os.environ.get("DOCKER_HOST") and CONTAINERS.exists():
        env = subprocess.run([str(CONTAINERS), "env"], capture_output=True, text=True, timeout=30)
        for line in env.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            if key and value:
                os.environ[key] = value.strip("'\"")
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if result.returncode:
        return "no Docker engine answers (docker info failed; `containers setup` starts podman's Docker API)"
    result = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    return None if result.returncode == 0 else "docker compose is not available"


class Stack:
    """The compose stack under its own project name and free host ports; never the developer's files."""

    def __init__(self) -> None:
        self.project = f"chatbridgetest{uuid.uuid4().hex[:8]}"
        self.mqtt, self.ws, self.http = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "CHAT_MQTT_PORT": str(self.mqtt),
            "CHAT_WS_PORT": str(self.ws),
            "CHAT_HTTP_PORT": str(self.http),
        }

    def compose(self, *args: str, stdin: str | None = None, timeout: float = 600) -> str:
        result = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"docker compose {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def add_user(self, name: str, password: str) -> str:
        return self.compose("run", "--rm", "-T", "bridge", "users", "add", name, stdin=password + "\n")

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError as exc:
            return 0, {"error": str(exc)}

    def wait_healthy(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (answer := self.health())[0] != 200:
            assert time.monotonic() < deadline, f"the bridge never became healthy: {answer}"
            time.sleep(1)
        return answer[1]

    def client(self, user: str, password: str) -> ChatClient:
        client = ChatClient(
            user,
            "127.0.0.1",
            self.mqtt,
            client_id=f"{user}:{uuid.uuid4().hex[:8]}",
            username=user,
            password=password,
        ).start(timeout=30)
        client.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online", timeout=60)
        return client


@contextmanager
def stack() -> Iterator[Stack]:
    running = Stack()
    try:
        yield running
    finally:
        subprocess.run(
            ["docker", "compose", "-p", running.project, "down", "-v"],
            cwd=ROOT,
            env=running.env,
            capture_output=True,
            timeout=300,
        )


@pytest.mark.docker
def test_the_stack_chats_survives_down_up_and_takes_accounts_added_while_running() -> None:
    reason = docker_engine()
    if reason:
        pytest.skip(f"{reason}: the compose stack was not started; its wiring is checked by the tests above")
    passwd = ROOT / "mosquitto" / "passwd"
    before = passwd.read_bytes() if passwd.exists() else None
    with stack() as s:
        s.compose("build")
        # An account made before `up` is registered in the stack's PostgreSQL, not in a local file.
        assert "registered in postgresql" in s.add_user("alice", "alice-password-1")
        s.compose("up", "-d", "--wait")
        body = s.wait_healthy()
        assert body["broker"]["connected"] and body["database"]["reachable"]

        # An account added while the stack runs can log in at once (no restart, no SIGHUP).
        s.add_user("bob", "bob-password-22")
        bob = s.client("bob", "bob-password-22")
        bob.connect_chat()
        alice = s.client("alice", "alice-password-1")
        alice.connect_chat()
        # bob knows alice although she never connected: `users add` registered her in PostgreSQL
        direct = alice.request("create-conversation", kind="direct", participants=["bob"])
        conversation = direct["data"]["conversation"]["conversation_id"]
        alice.request("send-message", conversation_id=conversation, body="hello through the stack")
        assert bob.next_of("message-added")["data"]["message"]["body"] == "hello through the stack"
        alice.stop()
        bob.stop()
        with pytest.raises(TimeoutError):  # no account: refused, never subscribed
            ChatClient(
                "mallory", "127.0.0.1", s.mqtt, client_id="mallory", username="mallory", password="x" * 12
            ).start(timeout=5)

        # down and up again: the messages and the accounts are still there.
        s.compose("down")
        s.compose("up", "-d", "--wait")
        s.wait_healthy()
        bob = s.client("bob", "bob-password-22")
        history = bob.request("get-messages", conversation_id=conversation, since_seq=0)
        assert [m["body"] for m in history["data"]["messages"]] == ["hello through the stack"]
        bob.stop()
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/metrics", timeout=10) as response:
            assert b'chat_bridge_commands_total{command="get-messages",outcome="ok"}' in response.read()
    assert (passwd.read_bytes() if passwd.exists() else None) == before  # the developer's file untouched
