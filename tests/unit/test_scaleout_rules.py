"""Scale-out rules without NATS: the partition hash, the shipped NATS configuration, the spread of
partitions over workers, and leases with fencing (on SQLite; PostgreSQL in the integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from bridge import natsconf
from bridge.leases import LEADER, Fenced, Leases
from bridge.worker import share

ROOT = Path(__file__).resolve().parents[2]


def test_partition_is_natss_fnv1a_of_the_user_id() -> None:
    # what NATS 2.9's {{partition(8,1)}} gave for these users (checked against a running server)
    assert natsconf.partition_of("bob", 8) == 4
    assert natsconf.partition_of("alice", 8) == 7
    assert all(0 <= natsconf.partition_of(f"u{i}", 64) < 64 for i in range(1000))


def test_shipped_nats_configuration_is_what_the_code_writes() -> None:
    for path, content in natsconf.shipped(ROOT / "nats").items():
        assert path.read_text() == content, f"{path} differs: run python -m bridge.natsconf nats"


def test_users_conf_round_trips_and_scopes_each_user_to_itself() -> None:
    text = natsconf.users_conf({"alice": "$2b$11$a", "chat-bridge": "$2b$11$b", "chat-push": "$2b$11$c"})
    assert natsconf.read_users_text(text) == {
        "alice": "$2b$11$a",
        "chat-bridge": "$2b$11$b",
        "chat-push": "$2b$11$c",
    }
    alice = next(line for line in text.splitlines() if '"alice"' in line)
    block = text[text.index(alice) :].split("allowed_connection_types")[0]
    assert '"cmd.*.alice.*"' in block and "bob" not in block
    assert '"chat.v1.users.alice.inbox"' in block
    assert "notifications" not in block  # only the push gateway reads notifications
    push = text[text.index('"chat-push"') :]
    assert '"chat.v1.notifications.*"' in push.split("allowed_connection_types")[0]


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_partitions_are_spread_evenly_and_completely(workers: int) -> None:
    live = sorted(f"w{i}" for i in range(workers))
    shares = [share(64, live, w) for w in live]
    assert set().union(*shares) == set(range(64))
    assert sum(len(s) for s in shares) == 64
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    assert share(64, live, "not-alive") == set()


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = create_engine(f"sqlite:///{tmp_path / 'leases.sqlite3'}")
    Leases(e, "setup").ensure(4)
    yield e
    e.dispose()


def test_a_lease_is_held_until_it_expires_and_a_takeover_fences_the_old_owner(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = Leases(engine, "a", ttl_ms=60_000), Leases(engine, "b", ttl_ms=60_000)
    lease = a.acquire(2)
    assert lease is not None and lease.epoch == 1
    assert b.acquire(2) is None  # held
    assert a.renew([lease]) == set()
    # a's batch of stream sequences 1..5 commits inside its transaction
    with a._tx() as cur:
        a.record(cur, lease, 1, 5)
    assert a.applied(2) == ("a", 1, 5)
    # the same batch again (a redelivery after a lost COMMIT answer) is refused
    with pytest.raises(Fenced), a._tx() as cur:
        a.record(cur, lease, 1, 5)
    # a is paused past its lease: b takes over with a new epoch and the committed position
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE partition_leases SET expires_ms = 0 WHERE partition = 2")
    taken = b.acquire(2)
    assert taken is not None and taken.epoch == 2 and taken.applied_seq == 5
    # a wakes up: it can neither commit nor renew
    with pytest.raises(Fenced), a._tx() as cur:
        a.record(cur, lease, 6, 7)
    assert a.renew([lease]) == {2}
    with b._tx() as cur:
        b.record(cur, taken, 6, 7)
    assert b.applied(2) == ("b", 2, 7)


def test_the_cluster_epoch_changes_only_when_no_worker_was_alive(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = Leases(engine, "a"), Leases(engine, "b")
    first, _, fresh = a.cluster_epoch("e1")
    assert (first, fresh) == ("e1", True)
    second, _, fresh = b.cluster_epoch("e2")  # a is alive: b joins its epoch
    assert (second, fresh) == ("e1", False)
    a.leave()
    b.leave()
    third, _, fresh = a.cluster_epoch("e3")  # everyone had gone: a cluster restart
    assert (third, fresh) == ("e3", True)
    assert a.claim_expiry("e3") and not b.claim_expiry("e3")


def test_the_leader_lease_is_a_partition_of_its_own(engine) -> None:  # type: ignore[no-untyped-def]
    a = Leases(engine, "a")
    assert a.acquire(LEADER) is not None
    assert Leases(engine, "b").acquire(LEADER) is None


def test_a_workers_nats_credentials_go_to_every_server_it_learns_of() -> None:
    from bridge.worker import nats_credentials

    assert nats_credentials(["nats://127.0.0.1:4222", "nats://chat-bridge:p%40ss@127.0.0.1:4223"]) == {
        "user": "chat-bridge",
        "password": "p@ss",
    }
    assert nats_credentials(["127.0.0.1:4222"]) == {}


def test_a_new_command_log_starts_every_partition_again(engine) -> None:  # type: ignore[no-untyped-def]
    leases = Leases(engine, "w1")
    # a database from before the record: applied within this log's sequences, so the same log
    lease = leases.acquire(0)
    assert lease is not None
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE partition_leases SET applied_seq = 40 WHERE partition = 0")
    assert leases.adopt_log("$MQTT_msgs", "2026-12-01T00:00:00", last_seq=50) is None
    assert leases.applied(0)[2] == 40
    assert leases.adopt_log("$MQTT_msgs", "2026-12-01T00:00:00", last_seq=60) is None  # the same again
    # the stream made again (NATS's JetStream data gone): another creation time
    assert leases.adopt_log("$MQTT_msgs", "2026-12-03T00:00:00", last_seq=3) == 40
    assert leases.applied(0)[2] == 0
    assert leases.epochs()[0] == lease.epoch  # epochs never go back: fencing still holds


def test_a_database_applied_past_the_logs_end_is_of_another_log(engine) -> None:  # type: ignore[no-untyped-def]
    leases = Leases(engine, "w1")
    assert leases.acquire(1) is not None
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE partition_leases SET applied_seq = 2047 WHERE partition = 1")
    assert leases.adopt_log("$MQTT_msgs", "2026-12-03T00:00:00", last_seq=12) == 2047
    assert leases.applied(1)[2] == 0
