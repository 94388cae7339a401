"""The TypeScript SDK (clients/js): its types match schemas/, it type-checks, `npm run build` writes the
package (ES modules and type declarations for Node and bundlers, one ES module for pages without a
bundler), its own tests (Node's test runner, clients/js/test) pass against a real
`chat-bridge serve` of this checkout, and examples/echo-bot.mjs (docs/sdk-js.md) answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, EmbeddedBroker, running_bridge

from chat_bridge import Client

JS = ROOT / "clients" / "js"
EXAMPLE = ROOT / "examples" / "echo-bot.mjs"


def npm(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    if not shutil.which("npm"):
        pytest.skip("npm is not installed (scripts/test installs Node and npm)")
    if not (JS / "node_modules" / "mqtt").is_dir():
        pytest.fail("clients/js/node_modules is missing: run `npm ci` in clients/js (scripts/test does)")
    exe = Path(sys.executable).with_name("chat-bridge")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_BRIDGE_")}
    env["CHAT_BRIDGE_EXE"] = str(exe)
    return subprocess.run(
        ["npm", "run", "--silent", *args], cwd=JS, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", ["check-generated", "typecheck"])
def test_the_sdks_types_are_generated_from_the_schemas_and_check(script: str) -> None:
    done = npm(script)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def built() -> Path:
    """`npm run build`, as docs/sdk-js.md tells users to run it."""
    done = npm("build")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return JS / "dist"


def test_npm_run_build_writes_modules_declarations_and_a_browser_bundle(built: Path) -> None:
    outputs = (
        "index.js",
        "index.d.ts",
        "client.d.ts",
        "generated/protocol.d.ts",
        "browser/chat-bridge-client.js",
    )
    for name in outputs:
        assert (built / name).is_file(), name
    assert "export declare class ChatClient" in (built / "client.d.ts").read_text()
    # Node resolves the package by its name (package.json "exports") to the built ES module
    script = (
        'const sdk = await import("chat-bridge-client");'
        'const c = new sdk.ChatClient({ user: "alice", url: "mqtt://127.0.0.1:1" });'
        "console.log(JSON.stringify({ exports: Object.keys(sdk).sort(), clientId: c.clientId }));"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script], cwd=JS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {"ChatClient", "ProtocolError", "RequestTimeout", "COMMAND_NAMES"} <= set(out["exports"])
    assert re.fullmatch(r"alice:[0-9a-f]{12}", out["clientId"])
    # the browser bundle is one ES module with MQTT.js inside: no imports left, the SDK's names exported
    bundle = (built / "browser" / "chat-bridge-client.js").read_text()
    assert not re.search(r"""(^|[;}])\s*import\s*[\w{*]""", bundle)
    exported = re.findall(r"export\s*\{([^}]*)\}", bundle)[-1]
    names = {part.split(" as ")[-1].strip() for part in exported.split(",")}
    assert {"ChatClient", "ProtocolError", "ConnectionFailed", "clientIdFor"} <= names, names


def test_the_sdks_own_tests_pass_against_a_real_bridge() -> None:
    done = npm("test")
    output = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    # every test ran and passed (a hook that fails cancels the tests of its suite)
    assert "# fail 0" in done.stdout and "# cancelled 0" in done.stdout, output
    summary = dict(re.findall(r"^# (tests|pass) (\d+)$", done.stdout, re.M))
    assert summary["tests"] == summary["pass"], output


def test_the_docs_bot_is_examples_echo_bot() -> None:
    text = (ROOT / "docs" / "sdk-js.md").read_text()
    match = re.search(r"<!-- bot example -->\n```js\n(.*?)```", text, re.S)
    assert match, "no js block after <!-- bot example --> in docs/sdk-js.md"
    assert match.group(1) == EXAMPLE.read_text()
    assert len([line for line in match.group(1).splitlines() if line.strip()]) <= 10


def test_the_echo_bot_example_answers_and_says_goodbye(
    built: Path, embedded_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """examples/echo-bot.mjs in a project that installed the SDK from the checkout (a link, as npm makes)."""
    project = tmp_path / "project"
    (project / "node_modules").mkdir(parents=True)
    (project / "node_modules" / "chat-bridge-client").symlink_to(JS, target_is_directory=True)
    shutil.copy(EXAMPLE, project / "echo-bot.mjs")
    port = embedded_broker.port
    with running_bridge(port, f"sqlite:///{tmp_path / 'chat.sqlite3'}"), Client("alice", port=port) as alice:
        bot = subprocess.Popen(
            ["node", "echo-bot.mjs", f"mqtt://127.0.0.1:{port}"],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            alice.wait_for("user-connected", lambda e: e.data["user"]["user_id"] == "echo-bot", timeout=30)
            conv = alice.create_direct("echo-bot")
            alice.send_message(conv["conversation_id"], "ping")
            echoed = alice.wait_for("message-added", lambda e: e.message["sender_id"] == "echo-bot")  # type: ignore[index]
            assert echoed.message is not None
            assert (echoed.message["conversation_id"], echoed.message["body"]) == (
                conv["conversation_id"],
                "echo: ping",
            )
            alice.send_message("global", "hello bots")
            echoed = alice.wait_for("message-added", lambda e: e.message["sender_id"] == "echo-bot")  # type: ignore[index]
            assert echoed.message is not None and echoed.message["body"] == "echo: hello bots"
            bot.terminate()  # SIGTERM: the bot sends `disconnect`, so alice sees it leave without a will
            alice.wait_for("user-disconnected", lambda e: e.data["user_id"] == "echo-bot", timeout=10)
            out, err = bot.communicate(timeout=10)
        finally:
            if bot.poll() is None:
                bot.kill()
                bot.communicate()
    assert bot.returncode == 0, out + err
    assert err == "", err
