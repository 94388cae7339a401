"""The TypeScript SDK (clients/js): its types match schemas/, it type-checks, and its own tests (Node's
test runner, clients/js/test) pass against a real `chat-bridge serve` of this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

JS = ROOT / "clients" / "js"


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


def test_the_sdks_own_tests_pass_against_a_real_bridge() -> None:
    done = npm("test")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout
