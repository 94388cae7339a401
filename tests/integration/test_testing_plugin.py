"""chat_bridge.testing as a user meets it: the pytest plugin (by its entry point) and BridgeProcess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ACCOUNTS, ROOT, Mosquitto

from chat_bridge import errors
from chat_bridge.testing import BridgeProcess, BridgeStartError

DOCS = ROOT / "docs" / "sdk-python.md"


def documented(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"no python block after {marker} in {DOCS}"
    return match.group(1)


def run_pytest(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "users_project" / "test_users_code.py"
    test.parent.mkdir()
    test.write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), *args],
        cwd=test.parent,  # outside this repository: no conftest of ours
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_documented_plugin_example_passes_in_a_project_of_its_own(tmp_path: Path) -> None:
    code = documented("<!-- plugin example -->")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    result = run_pytest(tmp_path, code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_a_failing_user_test_fails(tmp_path: Path) -> None:
    code = (
        "def test_wrong(chat_client):\n"
        "    alice = chat_client('alice')\n"
        "    alice.send_message('global', 'hi')\n"
        "    assert alice.get_messages('global')['messages'][-1]['body'] == 'bye'\n"
    )
    result = run_pytest(tmp_path, code)
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout


def test_the_plugin_runs_the_bridge_against_a_given_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    code = (
        "def test_via_mosquitto(chat_bridge_server, chat_client):\n"
        f"    assert chat_bridge_server.port == {mosquitto.port} and chat_bridge_server.broker_url\n"
        "    bob = chat_client('bob')\n"
        "    assert chat_client('alice').create_direct('bob')['participants'] == ['alice', 'bob']\n"
        "    assert bob.wait_for('conversation-created').request_id is None\n"
    )
    result = run_pytest(tmp_path, code, f"--chat-bridge-broker-url=mqtt://127.0.0.1:{mosquitto.port}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_on_a_broker_where_another_bridge_is_online(tmp_path: Path, mosquitto: Mosquitto) -> None:
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    with BridgeProcess(tmp_path / "theirs", broker_url=url) as theirs:
        # the same prefix: both bridges would take every command; refused before anything starts
        mine = BridgeProcess(tmp_path / "mine", broker_url=url)
        try:
            with pytest.raises(BridgeStartError, match=r"another chat-bridge is online .* 'chat/v1'"):
                mine.start()
        finally:
            mine.stop()
        assert mine.epoch is None and mine.log() == ""
        code = "def test_mine(chat_client):\n    chat_client('alice')\n"
        result = run_pytest(tmp_path, code, f"--chat-bridge-broker-url={url}")
        assert result.returncode == 1 and "another chat-bridge is online" in result.stdout, result.stdout
        # a prefix of their own: ready with its own epoch, not the one the other bridge retained
        code = (
            "def test_mine(chat_bridge_server, chat_client):\n"
            "    assert chat_bridge_server.prefix == 'test/v1'\n"
            f"    assert chat_bridge_server.epoch not in (None, {theirs.epoch!r})\n"
            "    assert chat_bridge_server.epoch in chat_bridge_server.log()\n"
            "    alice, bob = chat_client('alice'), chat_client('bob')\n"
            "    alice.send_message(alice.create_direct('bob')['conversation_id'], 'hi')\n"
            "    assert bob.wait_for('message-added').message['body'] == 'hi'\n"
        )
        (tmp_path / "users_project").rename(tmp_path / "first_project")
        result = run_pytest(
            tmp_path, code, f"--chat-bridge-broker-url={url}", "--chat-bridge-topic-prefix=test/v1"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        with theirs.client("carol") as carol:  # the other bridge saw none of it
            assert [c["conversation_id"] for c in carol.get_conversations()] == ["global"]
        # nor lost its broker connection to it (one MQTT client id, one session per prefix)
        assert "lost the connection" not in theirs.log(), theirs.log()


def test_bridge_process_restart_keeps_the_data_and_changes_the_epoch(tmp_path: Path) -> None:
    with BridgeProcess(tmp_path) as bridge:
        first = bridge.epoch
        with bridge.client("alice") as alice:
            alice.send_message("global", "kept")
            before = alice.session_id
            bridge.restart()
            assert bridge.epoch != first
            # the embedded broker went too: reconnected, with a new session, announced again
            alice.wait_for("connected", lambda e: e.data["session_id"] != before, timeout=20)
            assert [m["body"] for m in alice.get_messages("global")["messages"]] == ["kept"]
            with pytest.raises(errors.NotFound):
                alice.get_participants("c_none")
    assert "online" in bridge.log()


def test_the_plugin_against_mosquitto_with_accounts(
    tmp_path: Path, secure_mosquitto: tuple[Mosquitto, Path]
) -> None:
    broker, _ = secure_mosquitto
    code = (
        "import pytest\n"
        "from chat_bridge import ConnectionFailed\n\n"
        "def test_with_accounts(chat_client):\n"
        "    alice = chat_client('alice', password='alice-pw')\n"
        "    bob = chat_client('bob', password='bob-pw', device='phone')\n"
        "    alice.send_message(alice.create_direct('bob')['conversation_id'], 'hi')\n"
        "    assert bob.wait_for('message-added').message['body'] == 'hi'\n"
        "    with pytest.raises(ConnectionFailed):\n"
        "        chat_client('mallory', password='wrong')\n"
    )
    url = f"mqtt://chat-bridge:{ACCOUNTS['chat-bridge']}@127.0.0.1:{broker.port}"
    result = run_pytest(tmp_path, code, f"--chat-bridge-broker-url={url}")
    assert result.returncode == 0, result.stdout + result.stderr
