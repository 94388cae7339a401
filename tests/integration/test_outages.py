"""Outages of the database and of the broker, and sessions that are never re-announced."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from chatclient import ChatClient
from conftest import Mosquitto, running_bridge, scratch_postgres
from sqlalchemy.engine import make_url
from tcpproxy import Proxy


def test_postgres_outage_of_ten_seconds_loses_nothing(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    with scratch_postgres() as url:
        real = make_url(url)
        proxy = Proxy(real.host or "127.0.0.1", real.port or 5432)
        via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
        caplog.set_level(logging.INFO, logger="bridge")
        with running_bridge(mosquitto.port, via_proxy):
            alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
            alice.connect_chat()
            alice.request("send-message", conversation_id="global", body="before", client_msg_id="m0")
            proxy.cut()
            cut_at = time.monotonic()
            for i in range(1, 21):
                alice.send(
                    "send-message",
                    conversation_id="global",
                    body=f"during {i}",
                    client_msg_id=f"m{i}",
                    request_id=f"d{i}",
                )
            with pytest.raises(TimeoutError):  # nothing is answered while the database is away
                alice.answer("d1", timeout=10 - (time.monotonic() - cut_at))
            proxy.restore()
            answers = [alice.answer(f"d{i}", timeout=30) for i in range(1, 21)]
            assert [a["type"] for a in answers] == ["message-added"] * 20
            assert [a["data"]["message"]["seq"] for a in answers] == list(range(2, 22))
            history = alice.request("get-messages", conversation_id="global", since_seq=0)["data"]["messages"]
            assert [m["client_msg_id"] for m in history] == [f"m{i}" for i in range(21)]
            alice.stop()
        proxy.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bridge")]
    retries = [line for line in lines if line.startswith("storage unavailable")]
    assert 2 <= len(retries) <= 12, retries  # backs off (0.5 s doubling to 5 s): no busy loop
    assert any(line.startswith("storage is back after") for line in lines), lines


def restartable_mosquitto(tmp_path: Path) -> Mosquitto:
    from conftest import ROOT

    data = tmp_path / "mq-data"
    data.mkdir()
    return Mosquitto(
        tmp_path, ROOT / "mosquitto" / "dev.conf", {"persistence": "true", "persistence_location": f"{data}/"}
    )


def test_the_bridge_reconnects_to_a_restarted_broker(tmp_path: Path) -> None:
    from conftest import mosquitto_available

    if not mosquitto_available():
        pytest.skip("the mosquitto binary is not installed (scripts/test installs it)")
    broker = restartable_mosquitto(tmp_path).start()
    try:
        with running_bridge(broker.port, f"sqlite:///{tmp_path / 'c.sqlite3'}") as bridge:
            alice = ChatClient("alice", "127.0.0.1", broker.port).start()
            alice.connect_chat()
            epoch = alice.wait_retained("chat/v1/bridge/status", lambda s: s["status"] == "online")["epoch"]
            broker.stop()
            bridge.ready.clear()  # type: ignore[attr-defined]
            # forget the status seen before the restart: only one received after it proves alice is back
            with alice._retained_changed:
                alice.retained.pop("chat/v1/bridge/status", None)
            broker.start()  # same port, same persisted sessions
            alice.wait_retained(
                "chat/v1/bridge/status", lambda s: s["status"] == "online" and s["epoch"] == epoch, timeout=30
            )
            # alice's paho reconnected and resubscribed by itself; the bridge resubscribed too
            answer = alice.request(
                "send-message", conversation_id="global", body="after the restart", timeout=30
            )
            assert answer["type"] == "message-added"
            alice.stop()
    finally:
        broker.stop()


def test_sessions_not_re_announced_after_a_bridge_restart_end(mosquitto: Mosquitto, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
    bob = ChatClient("bob", "127.0.0.1", mosquitto.port).start()
    with running_bridge(mosquitto.port, db):
        alice.connect_chat()
        bob.connect_chat()
    # While the bridge is away alice's app quits silently (MQTT DISCONNECT: no will, no chat disconnect).
    alice.client.disconnect()
    alice.client.loop_stop()
    with running_bridge(mosquitto.port, db, session_grace=1.0):
        bob.connect_chat()  # bob re-announces on the new epoch, as clients must
        gone = bob.wait_for(lambda e: e["type"] == "user-disconnected", timeout=15)
        assert gone["data"] == {"user_id": "alice"}
        users = bob.request("get-active-users")["data"]["users"]
        assert [u["user_id"] for u in users] == ["bob"]
    bob.stop()


def test_a_postgres_restart_costs_no_retry_delay(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Pooled connections are not pinged before use: one the server closed is replaced at once."""
    import psycopg

    with scratch_postgres() as url:
        caplog.set_level(logging.INFO, logger="bridge")
        with running_bridge(mosquitto.port, url):
            alice = ChatClient("alice", "127.0.0.1", mosquitto.port).start()
            alice.connect_chat()
            alice.request("send-message", conversation_id="global", body="before")
            name = make_url(url).database
            admin = make_url(url).set(drivername="postgresql", database="postgres")
            with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                ).fetchone()
            assert killed and killed[0] >= 1  # the bridge's pooled connection is gone
            answer = alice.request("send-message", conversation_id="global", body="after", timeout=5)
            assert answer["type"] == "message-added" and answer["data"]["message"]["seq"] == 2
            alice.stop()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bridge")]
    assert any(line.startswith("the database connection was lost") for line in lines), lines
    assert not any(line.startswith("storage unavailable") for line in lines), lines
