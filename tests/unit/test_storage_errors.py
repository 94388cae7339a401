"""Storage errors are translated at the store's boundary: the service and the pipeline see the store's
own errors (StorageUnavailable, Conflict, StorageError), never SQLAlchemy's or the driver's."""

from __future__ import annotations

import inspect
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy.exc
from world import World

from bridge.model import Conflict, StorageError, StorageUnavailable
from bridge.sql import TRANSLATION, SqlStore, SqlUnitOfWork, init_db, is_transient, make_engine, storage_error


def test_every_sqlalchemy_dbapi_error_is_mapped() -> None:
    """A drift test: a DBAPIError subclass SQLAlchemy adds must get a translation here."""
    classes = {
        cls
        for _, cls in inspect.getmembers(sqlalchemy.exc, inspect.isclass)
        if issubclass(cls, sqlalchemy.exc.DBAPIError)
    }
    assert classes == set(TRANSLATION), classes ^ set(TRANSLATION)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (sqlalchemy.exc.IntegrityError, Conflict),
        (sqlalchemy.exc.OperationalError, StorageUnavailable),
        (sqlalchemy.exc.InterfaceError, StorageUnavailable),
        (sqlalchemy.exc.ProgrammingError, StorageError),
        (sqlalchemy.exc.DataError, StorageError),
    ],
)
def test_translation(cls: type[sqlalchemy.exc.DBAPIError], expected: type[StorageError]) -> None:
    got = storage_error(cls("SELECT 1", None, Exception("boom")))
    assert type(got) is expected and str(got) == "boom"
    assert is_transient(got) == (expected is StorageUnavailable)


def test_a_lost_connection_is_unavailable_whatever_its_class() -> None:
    got = storage_error(
        sqlalchemy.exc.ProgrammingError("SELECT 1", None, Exception("gone"), connection_invalidated=True)
    )
    assert isinstance(got, StorageUnavailable) and got.connection_lost


def sqlite_store(tmp_path: Path) -> SqlUnitOfWork:
    engine = make_engine(f"sqlite:///{tmp_path / 'e.sqlite3'}")
    init_db(engine, 0)
    return SqlUnitOfWork(engine)


def test_the_store_raises_its_own_errors(tmp_path: Path) -> None:
    uow = sqlite_store(tmp_path)
    with pytest.raises(StorageError) as bad, uow.transaction() as store:
        assert isinstance(store, SqlStore)
        store._run("SELECT ?", ())  # a bug: a missing parameter (sqlite3.ProgrammingError)
    assert not isinstance(bad.value, sqlalchemy.exc.SQLAlchemyError | sqlite3.Error)
    assert not is_transient(bad.value)
    with pytest.raises(Conflict), uow.transaction() as store:
        assert isinstance(store, SqlStore)
        store._run("INSERT INTO users (user_id, created_ms) VALUES ('a', 0)")
        store._run("INSERT INTO users (user_id, created_ms) VALUES ('a', 0)")


def test_a_locked_database_is_unavailable_to_the_service(tmp_path: Path) -> None:
    uow = sqlite_store(tmp_path)
    uow.engine.dispose()
    path = tmp_path / "e.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    engine.pool._creator = lambda: sqlite3.connect(path, timeout=0.05, check_same_thread=False)  # type: ignore[attr-defined]
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    w = World(SqlUnitOfWork(engine))
    w.service.transient = (StorageUnavailable,)
    with pytest.raises(StorageUnavailable):
        w.do("alice", "send-message", conversation_id="global", body="hi")
    locker.execute("ROLLBACK")
    assert (
        w.do("alice", "send-message", conversation_id="global", body="hi").answer["type"] == "message-added"
    )


def test_an_unreachable_database_is_unavailable() -> None:
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    with pytest.raises(StorageUnavailable) as down, SqlUnitOfWork(engine).transaction():
        pass
    assert down.value.connection_lost and is_transient(down.value)


def test_a_pool_with_no_free_connection_is_unavailable(tmp_path: Path) -> None:
    """Every pooled connection busy past the pool's timeout: an outage to retry, not SQLAlchemy's error."""
    path = tmp_path / "e.sqlite3"
    init_db(make_engine(f"sqlite:///{path}"), 0)
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0, pool_timeout=0.05)
    held = engine.raw_connection()
    with pytest.raises(StorageUnavailable) as busy, SqlUnitOfWork(engine).reading():
        pass
    assert is_transient(busy.value) and not busy.value.connection_lost
    held.close()
    with SqlUnitOfWork(engine).reading() as store:
        assert store.get_user("nobody") is None
    engine.dispose()
