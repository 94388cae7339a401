"""ChatBridgeContainer: the project's image with Mosquitto and PostgreSQL, through testcontainers."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from conftest import ROOT

from chat_bridge.testing import containers

pytestmark = pytest.mark.docker


def engine_problem() -> str | None:
    try:
        client = containers._docker().from_env()
        client.ping()
        client.close()
        return None
    except Exception as exc:
        return f"no Docker-compatible engine answers ({type(exc).__name__}); set DOCKER_HOST"


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    if reason := engine_problem():
        pytest.skip(reason)
    containers.build_images(ROOT)  # the checkout as it is (.dockerignore keeps local state out)
    yield


def test_the_documented_container_example(images: None) -> None:
    match = re.search(
        r"<!-- container example -->\n```python\n(.*?)```", (ROOT / "docs/sdk-python.md").read_text(), re.S
    )
    assert match
    code = match.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    scope: dict[str, object] = {}
    exec(compile(code, "docs/sdk-python.md", "exec"), scope)
    scope["test_alice_and_bob_through_the_image"]()  # type: ignore[operator]


def test_an_image_not_built_is_named_before_anything_starts(images: None) -> None:
    from testcontainers.core.labels import LABEL_SESSION_ID, SESSION_ID

    stack = containers.ChatBridgeContainer(bridge_image="chat-bridge-never-built:latest")
    with pytest.raises(containers.ContainerStartError, match=r"chat-bridge-never-built:latest is not there"):
        stack.start()
    client = containers._docker().from_env()
    try:  # no container of this test session was made (nor a network)
        mine = {"label": f"{LABEL_SESSION_ID}={SESSION_ID}"}
        assert client.containers.list(all=True, filters=mine) == []
        assert client.networks.list(filters=mine) == []
    finally:
        client.close()


def test_the_bridge_restarts_on_its_postgres_data(images: None) -> None:
    with containers.ChatBridgeContainer() as stack, stack.client("alice") as alice:
        alice.send_message("global", "stored in postgres")
        first = stack.epoch
        session = alice.session_id
        alice.wait_for("connected", timeout=1)  # the first announcement's answer
        stack.restart_bridge()
        assert stack.epoch != first
        # the broker stayed: the same session is announced again for the new epoch
        again = alice.wait_for(
            "connected", lambda e: e.data["session_id"] == session and e.request_id is not None, timeout=30
        )
        assert again.data["user"]["user_id"] == "alice"
        assert [m["body"] for m in alice.get_messages("global")["messages"]] == ["stored in postgres"]
        assert "Traceback" not in stack.logs("bridge")
