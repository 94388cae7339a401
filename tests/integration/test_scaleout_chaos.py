"""A short pass of bench/chaos_scaleout.py: one NATS node, workers over PostgreSQL, users chatting
while the housekeeping leader is SIGKILLed (a new worker starts) and another worker is paused past
its lease and resumed; afterwards nothing acknowledged is lost, nothing applied twice, `seq` is
gapless, each user's messages are in send order and the wills come after their users' commands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from natscluster import nats_available

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not nats_available(), reason="nats-server is not installed (Debian package nats-server)"
    ),
]


def test_scaleout_chaos_keeps_every_acknowledged_command_once_and_in_order(postgres_url: str) -> None:
    # postgres_url: skips with the reason when no PostgreSQL is reachable (chaos_scaleout makes its own)
    from chaos_scaleout import run

    result = run(
        users=12,
        nodes=1,
        workers=2,
        partitions=8,
        lease=3,
        rate=5,
        seconds=14,
        schedule=[(2, "kill"), (3, "wills"), (7, "pause")],
    )
    print(result)
    assert result["sent"] == result["acknowledged"] == result["applied"] > 0
    assert result["lost_acknowledged"] == 0
    assert result["applied_twice"] == 0
    assert result["seq_gaps"] == 0
    assert result["order_violations"] == 0
    assert result["wills"] == 3
    assert result["wills_not_applied"] == result["wills_before_earlier_commands"] == 0
    assert len(result["takeover_s"]) == 2  # the killed worker's and the paused worker's partitions
