"""docker-compose.yml: what can be checked without a Docker engine, and a real run where one exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_ports_volumes_and_healthchecks() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"mosquitto", "postgres", "bridge"}
    assert {"1883:1883", "9001:9001"} <= set(services["mosquitto"]["ports"])
    for name in services:
        assert services[name]["healthcheck"]["test"], name
    assert set(doc["volumes"]) == {"mosquitto-data", "postgres-data"}
    depends = services["bridge"]["depends_on"]
    assert depends == {
        "mosquitto": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }


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
    for key in ("plugin_opt_password_file", "acl_file", "persistence_location"):
        path = "/" + conf[key].rstrip("/")
        assert path in mounts or any(path.startswith(t) for t in mounts), (key, path)
        if key != "persistence_location":
            assert (ROOT / mounts[path].removeprefix("./")).name == Path(conf[key]).name
    assert (ROOT / "mosquitto/acl").exists()


def test_bridge_environment_matches_the_acl_and_the_database() -> None:
    env = compose()["services"]["bridge"]["environment"]
    assert env["CHAT_BRIDGE_BROKER_URL"].startswith("mqtt://chat-bridge:")
    assert env["CHAT_BRIDGE_BROKER_URL"].endswith("@mosquitto:1883")
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
    assert "pip install" in text and 'ENTRYPOINT ["chat-bridge"]' in text
    assert (ROOT / "docker/healthcheck.py").exists() and "docker/healthcheck.py" in text
    compile((ROOT / "docker/healthcheck.py").read_text(), "healthcheck.py", "exec")


def docker_engine() -> str | None:
    if not shutil.which("docker"):
        return "no docker client installed"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    return None if result.returncode == 0 else "no Docker engine is running (docker info failed)"


@pytest.mark.docker
def test_stack_runs_with_testcontainers(tmp_path: Path) -> None:
    reason = docker_engine()
    if reason:
        pytest.skip(f"{reason}: the compose stack was not started; its wiring is checked by the tests above")
    from testcontainers.compose import DockerCompose

    from bridge import passwords

    passwords.write(ROOT / "mosquitto/passwd", {"chat-bridge": passwords.hash_password("compose-test")})
    os.environ["BRIDGE_PASSWORD"] = "compose-test"
    with DockerCompose(
        str(ROOT), env_file=None, wait=True, build=True, services=["mosquitto", "postgres", "bridge"]
    ) as stack:
        stack.exec_in_container(["python", "/usr/local/bin/chat-bridge-healthcheck"], service_name="bridge")
