"""Short passes of bench/chaos_scaleout.py. One NATS node, workers over PostgreSQL, users chatting
while the housekeeping leader is SIGKILLed (a new worker starts) and another worker is paused past
its lease and resumed; and three NATS nodes, the one leading the command log SIGKILLed.
Afterwards nothing acknowledged is lost, nothing applied twice, `seq` is gapless, each user's
messages are in send order and the wills come after their users' commands.
And the chaos run's clients: one that loses its connection while a node is dead ends up on a live
node."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from natscluster import nats_available

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.skipif(
    not nats_available(), reason="nats-server is not installed (Debian package nats-server)"
)


def test_a_chaos_client_whose_connection_is_lost_while_a_node_is_dead_moves_to_a_live_node(
    tmp_path: Path,
) -> None:
    # NATS closes an MQTT connection whose session it cannot load while the session stream elects a
    # leader; a client that then moved on to the dead node must not stay there
    import socket

    from chaos_scaleout import Sender, acknowledged
    from scaleout import connect_all, nats_cluster

    cluster = nats_cluster(tmp_path / "nats", ["u0"], 3, 8)
    ports = [n.mqtt_port for n in cluster.nodes]
    s = Sender("u0", "c_x", ports, 2, True)
    try:
        connect_all([(s.mqtt, ports[2], [])])
        s.send(0)
        deadline = time.monotonic() + 30
        while not acknowledged(s.infos[0]):
            assert time.monotonic() < deadline, "no PUBACK before the kill"
            time.sleep(0.05)
        # (it may have moved already: a cluster's first MQTT connections can be refused)
        dead = (s.node + 1) % 3
        cluster.nodes[dead].kill()
        lost = s.reconnects
        s.mqtt.socket().shutdown(socket.SHUT_RDWR)  # its connection is lost: next is the dead node
        deadline = time.monotonic() + 10
        while s.reconnects == lost:
            assert time.monotonic() < deadline, "paho did not see its connection end"
            time.sleep(0.01)
        # the live nodes may refuse it for a while (JetStream elects leaders): it goes round them
        deadline = time.monotonic() + 60
        while not (s.mqtt.is_connected() and s.node != dead):
            assert time.monotonic() < deadline, f"still on node {s.node + 1}, not connected"
            time.sleep(0.05)
        assert s.refused >= 1  # it did try the dead node
        s.send(1)
        deadline = time.monotonic() + 30
        while not acknowledged(s.infos[1]):
            assert time.monotonic() < deadline, "no PUBACK from the live node"
            time.sleep(0.05)
    finally:
        s.mqtt.disconnect()
        s.mqtt.loop_stop()
        cluster.stop()


def assert_nothing_lost_twice_or_reordered(result: dict[str, Any]) -> None:
    assert result["sent"] == result["acknowledged"] == result["applied"] > 0
    assert result["lost_acknowledged"] == 0
    assert result["applied_twice"] == 0
    assert result["seq_gaps"] == 0
    assert result["order_violations"] == 0


@pytest.mark.postgres
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
    assert_nothing_lost_twice_or_reordered(result)
    assert result["wills"] == 3
    assert result["wills_not_applied"] == result["wills_before_earlier_commands"] == 0
    assert len(result["takeover_s"]) == 2  # the killed worker's and the paused worker's partitions


@pytest.mark.postgres
def test_scaleout_chaos_on_three_nodes_survives_the_command_logs_leader_being_killed(
    postgres_url: str,
) -> None:
    # the NATS node leading `$MQTT_msgs` (the command log) is SIGKILLed under load: its clients move
    # to the other nodes and publish again what was not acknowledged; a worker on it moves too
    from chaos_scaleout import run

    result = run(
        users=8,
        nodes=3,
        workers=2,
        partitions=8,
        lease=3,
        rate=5,
        seconds=16,
        schedule=[(4, "node")],
        kill_node="$MQTT_msgs",
    )
    print(result)
    assert_nothing_lost_twice_or_reordered(result)
