"""Health: what /healthz reports from the broker state and a database probe, without a network."""

from __future__ import annotations

import threading
from pathlib import Path

from bridge.metrics import Health, Metrics, Probe, database_probe


def test_healthy_only_with_broker_and_database_and_back_again() -> None:
    answers = [Probe(True, None, 3, 1)]
    health = Health(Metrics(), lambda: answers[-1], epoch="e_1", broker="mqtt://b:1883", min_interval=0)
    healthy, body = health.report()
    assert not healthy and body["broker"] == {
        "url": "mqtt://b:1883",
        "connected": False,
        "error": "not connected yet",
    }
    health.broker_up()
    healthy, body = health.report()
    assert healthy and body["status"] == "ok" and body["outbox_backlog"] == 3 and body["epoch"] == "e_1"
    answers.append(Probe(False, "gone"))
    healthy, body = health.report()
    assert not healthy and body["database"] == {"reachable": False, "error": "gone"}
    answers.append(Probe(True, None, 0, 0))
    health.broker_down("disconnected: lost")
    assert health.report()[0] is False
    health.broker_up()
    assert health.report()[0] is True
    assert health.metrics.broker_reconnects._value.get() == 1  # the first connect is not a reconnect


def test_a_probe_that_hangs_counts_as_unreachable_and_is_not_piled_up() -> None:
    release, calls = threading.Event(), []

    def hanging() -> Probe:
        calls.append(1)
        release.wait(5)
        return Probe(True, None, 0, 0)

    health = Health(Metrics(), hanging, timeout=0.1, min_interval=0)
    health.broker_up()
    for _ in range(3):
        healthy, body = health.report()
        assert not healthy and "did not answer within 0.1s" in body["database"]["error"]
    assert len(calls) == 1
    release.set()
    health.close()


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.commands.labels("connect", "ok").inc()
    assert b'chat_bridge_commands_total{command="connect",outcome="ok"} 1.0' in a.exposition()
    assert b"chat_bridge_commands_total{" not in b.exposition()


def test_counting_and_timing_commands_reach_the_exposition_of_their_own_registry() -> None:
    a, b = Metrics(), Metrics()
    for _ in range(3):
        a.count_command("send-message", "ok")
    a.count_command("send-message", "not-found")
    b.count_command("send-message", "ok")
    a.time_command("send-message", 0.0002)
    a.time_command("send-message", 0.002)
    text = a.exposition()
    assert b'chat_bridge_commands_total{command="send-message",outcome="ok"} 3.0' in text
    assert b'chat_bridge_commands_total{command="send-message",outcome="not-found"} 1.0' in text
    assert b'chat_bridge_command_duration_seconds_count{command="send-message"} 2.0' in text
    assert b'chat_bridge_command_duration_seconds_bucket{command="send-message",le="0.00025"} 1.0' in text
    assert b'chat_bridge_commands_total{command="send-message",outcome="ok"} 1.0' in b.exposition()
    assert a.totals()["commands"] == 4 and a.totals()["errors"] == 1


def test_the_sqlite_probe_reports_a_missing_file_and_never_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "gone.sqlite3"
    probe = database_probe(f"sqlite:///{path}")
    result = probe()
    assert not result.reachable and str(path) in (result.error or "")
    assert not path.exists()


def test_an_event_loop_that_stopped_running_its_tasks_is_unhealthy() -> None:
    """The embedded broker and the bridge share one event loop: when a library spins in it, the
    connection still looks up, but nothing is served."""
    now = [100.0]
    health = Health(Metrics(), lambda: Probe(True, None, 0, 0), min_interval=0, clock=lambda: now[0])
    health.broker_up()
    assert health.report()[0] is True  # no heartbeat yet (the loop is starting): the state decides
    health.loop_beat()
    now[0] += 4
    assert health.report()[0] is True
    now[0] += 3
    healthy, body = health.report()
    assert not healthy and body["broker"]["error"] == "the bridge's event loop has not run for 7s"
    health.loop_beat()
    assert health.report()[0] is True


def test_serve_beats_the_heartbeat_on_its_event_loop() -> None:
    import asyncio

    from bridge.cli import heartbeat

    beats = threading.Event()

    class Seen(Health):
        def loop_beat(self) -> None:
            beats.set()

    async def main() -> None:
        task = asyncio.create_task(heartbeat(Seen(Metrics(), lambda: Probe(True, None)), every=0.01))
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, beats.wait, 5), 5)
        task.cancel()

    asyncio.run(main())
    assert beats.is_set()
