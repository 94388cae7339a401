"""The browser client at `/`, end to end in headless Chromium (clients/web/test/e2e.mjs): two pages log
in as alice and bob to a real `chat-bridge serve`, chat both ways, type, edit, react, delete, read,
lose the connection and catch up, page history, search and use a group. Also: the committed bundle
in bridge/web/ is what a fresh build of clients/web produces, and a wheel ships it; the SDK's own
browser bundle (clients/js `npm run build`) works in a page without a bundler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Mosquitto, free_port, mosquitto_available
from test_cli import serve_cmd, serving, wait_for_line

from chat_bridge import Client

WEB = ROOT / "clients" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SEEDED = 60  # messages in global before the pages open: more than one page of history (50)

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


def node_modules() -> None:
    """clients/web's dependencies (scripts/test installs them with `npm ci`)."""
    for package in ("playwright-core", "esbuild", "typescript"):
        if not (WEB / "node_modules" / package).is_dir():
            pytest.fail(f"clients/web/node_modules/{package} is missing: run `npm ci` in clients/web")
    if not shutil.which("node"):
        pytest.fail("node is not installed")


def seed_global(host: str, port: int) -> None:
    with Client("carol", host, port) as carol:
        for n in range(1, SEEDED + 1):
            carol.send_message("global", f"seed {n}", client_msg_id=f"seed-{n}")


def run_e2e(url: str, tmp_path: Path, *extra: str) -> None:
    shots = os.environ.get("CHAT_BRIDGE_SCREENSHOTS") or str(tmp_path / "screenshots")
    cmd = ["node", "test/e2e.mjs", "--url", url, "--screenshots", shots, "--seeded-global", str(SEEDED)]
    cmd += ["--chromium", CHROMIUM, *extra]
    result = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{result.stdout.count('ok ') - result.stdout.count('not ok ')} passed, 0 failed" in result.stdout
    for name in ("two-pages-chat.png", "alice.png", "bob.png", "offline-reconnecting.png"):
        assert (Path(shots) / name).stat().st_size > 10_000, name


def serve_options() -> str:
    return subprocess.run(serve_cmd("--help"), capture_output=True, text=True, check=False).stdout


@needs_chromium
def test_two_pages_chat_through_the_embedded_broker(tmp_path: Path) -> None:
    node_modules()
    if "--ws-listen" not in serve_options():
        pytest.skip("this chat-bridge serve has no --ws-listen (the embedded broker without WebSockets)")
    mqtt, ws, http = free_port(), free_port(), free_port()
    args = ("--listen", f"127.0.0.1:{mqtt}", "--database-url", f"sqlite:///{tmp_path}/db.sqlite3")
    args += ("--ws-listen", f"127.0.0.1:{ws}", "--http-listen", f"127.0.0.1:{http}")
    with serving(tmp_path, *args) as proc:
        wait_for_line(proc, "bridge online")
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/config.json", timeout=10) as response:
            config = json.load(response)
        assert config["ws_url"] == f"ws://127.0.0.1:{ws}/mqtt" and config["accounts"] is False
        seed_global("127.0.0.1", mqtt)
        run_e2e(f"http://127.0.0.1:{http}/", tmp_path)


@needs_chromium
@pytest.mark.mosquitto
def test_two_pages_chat_through_mosquittos_websocket_listener(tmp_path: Path) -> None:
    """An external broker: /config.json names no listener, the page asks for its WebSocket URL."""
    node_modules()
    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    # mosquitto/dev.conf with a WebSockets listener (docs/browser.md); Mosquitto puts it on ws_port
    conf = tmp_path / "ws.conf"
    conf.write_text(
        (ROOT / "mosquitto" / "dev.conf").read_text() + "\nlistener 9001 127.0.0.1\nprotocol websockets\n"
    )
    mosquitto = Mosquitto(tmp_path, conf=conf).start()
    http = free_port()
    args = ("--broker-url", f"mqtt://127.0.0.1:{mosquitto.port}")
    args += ("--database-url", f"sqlite:///{tmp_path}/db.sqlite3", "--http-listen", f"127.0.0.1:{http}")
    try:
        with serving(tmp_path, *args) as proc:
            wait_for_line(proc, "bridge online")
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/config.json", timeout=10) as response:
                assert json.load(response)["ws_url"] is None
            seed_global("127.0.0.1", mosquitto.port)
            ws = f"ws://127.0.0.1:{mosquitto.ws_port}/mqtt"
            run_e2e(f"http://127.0.0.1:{http}/", tmp_path, "--ws", ws)
    finally:
        mosquitto.stop()


@needs_chromium
def test_the_sdks_browser_bundle_chats_from_a_page_without_a_bundler(tmp_path: Path) -> None:
    """dist/browser/chat-bridge-client.js imported by a page as docs/sdk-js.md shows (test/sdk-bundle.mjs)."""
    node_modules()
    js = ROOT / "clients" / "js"
    if not (js / "node_modules" / "mqtt").is_dir():
        pytest.fail("clients/js/node_modules is missing: run `npm ci` in clients/js (scripts/test does)")
    build = subprocess.run(
        ["npm", "run", "--silent", "build"], cwd=js, capture_output=True, text=True, timeout=240
    )
    assert build.returncode == 0, build.stdout + build.stderr
    mqtt, ws = free_port(), free_port()
    args = ("--listen", f"127.0.0.1:{mqtt}", "--database-url", f"sqlite:///{tmp_path}/db.sqlite3")
    args += ("--ws-listen", f"127.0.0.1:{ws}", "--http-listen", "off")
    body = "hello from a page without a bundler"
    with serving(tmp_path, *args) as proc:
        wait_for_line(proc, "bridge online")
        cmd = ["node", "test/sdk-bundle.mjs", "--ws", f"ws://127.0.0.1:{ws}/mqtt", "--chromium", CHROMIUM]
        cmd += ["--user", "page", "--body", body]
        result = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, timeout=120)
        print(result.stdout, result.stderr, sep="\n")
        assert result.returncode == 0, result.stdout + result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["ok"] and seen["transport"] == "ws" and seen["event"] == seen["sent"], seen
        assert seen["clientId"].startswith("page:")
        with Client("carol", "127.0.0.1", mqtt) as carol:
            stored = carol.get_messages("global")["messages"]
        assert [(m["sender_id"], m["body"]) for m in stored] == [("page", body)]


def test_the_page_type_checks_against_the_sdks_types() -> None:
    """clients/web takes the protocol's types from the SDK (generated from schemas/): a change there that
    the page does not follow fails here."""
    node_modules()
    tsc = WEB / "node_modules" / "typescript" / "bin" / "tsc"
    result = subprocess.run(
        ["node", str(tsc), "--noEmit", "-p", "."], cwd=WEB, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_committed_bundle_is_a_fresh_build_of_clients_web() -> None:
    node_modules()
    result = subprocess.run(
        ["node", "build.mjs", "--check"], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_data_ships_the_page() -> None:
    """pyproject's package-data takes every file of bridge/web/ into the wheel (`pip install .`)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in patterns["bridge"] for p in (ROOT / "bridge").glob(pattern) if p.is_file()}
    files = {p for p in (ROOT / "bridge" / "web").rglob("*") if p.is_file()}
    assert {"index.html", "app.js", "app.css", "favicon.svg"} <= {p.name for p in files}
    assert files <= shipped, sorted(str(p) for p in files - shipped)


def test_the_pages_state_unit_tests() -> None:
    """clients/web/test/store.test.mjs: unread counts, duplicates and revs, typing, receipts, presence."""
    node_modules()
    result = subprocess.run(
        ["node", "--test", "test/store.test.mjs"], cwd=WEB, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "# fail 0" in result.stdout, result.stdout + result.stderr
