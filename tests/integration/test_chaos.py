"""The chaos run (bench/chaos.py) at a size CI can afford: nothing lost, nothing duplicated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_chaos_loses_and_duplicates_nothing() -> None:
    from conftest import mosquitto_available

    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    from chaos import run

    result = run(clients=4, messages=60, kills=3, rate=20)
    print(result)
    assert result["sent"] == result["acknowledged"] == result["stored"] == 240
    assert (result["stored_twice"], result["seq_gaps"], result["never_seen"]) == (0, 0, 0)
