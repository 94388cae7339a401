"""The SQL store, assembled from its parts, and the unit of work that opens its transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import PoolProxiedConnection

from ..model import StorageUnavailable, Store
from .conversations import Conversations
from .messages import Messages
from .outbox import Outbox
from .receipts import Receipts
from .statements import Statements, declared
from .users import Sessions, Users


class SqlStore(Users, Sessions, Conversations, Messages, Receipts, Outbox):
    """A Store (`bridge.model.Store`) bound to one connection with an open transaction. Each part
    keeps its statements beside the methods that run them."""


class SqlUnitOfWork:
    """Transactions on an engine's pooled connections, each with a SqlStore bound to it; the driver's
    errors in connecting, committing and rolling back leave as the store's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements = Statements(engine.dialect, declared(SqlStore))

    def _open(self) -> tuple[PoolProxiedConnection, SqlStore]:
        """A pooled driver connection and a store on it."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            conn = self.engine.raw_connection()
        except dbapi_error as exc:  # unreachable: an outage
            raise StorageUnavailable(str(exc), connection_lost=True) from None
        except PoolTimeoutError as exc:  # every pooled connection stayed busy
            raise StorageUnavailable(str(exc)) from None
        try:
            return conn, SqlStore(conn, self.engine.dialect, self.statements)
        except dbapi_error as exc:
            lost = self.engine.dialect.is_disconnect(exc, conn.dbapi_connection, None)
            if lost:
                conn.invalidate(exc)
            conn.close()
            raise StorageUnavailable(str(exc), connection_lost=lost) from None

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """A transaction on a pooled driver connection, begun and ended by hand: `engine.begin()`
        cost about 100 µs per transaction, as much as the rest of a one-message batch."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        conn, store = self._open()
        try:
            if self.engine.dialect.name == "sqlite":
                store._run("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
            yield store
            store.flush_search()  # the FTS5 rows of the transaction's messages (SQLite)
            try:
                conn.commit()
            except dbapi_error as exc:
                raise store.translate(exc, "COMMIT") from None
        except BaseException:
            if conn.is_valid:
                try:
                    conn.rollback()
                except dbapi_error as exc:
                    store.translate(exc, "ROLLBACK")
            raise
        finally:
            conn.close()  # back to the pool

    @contextmanager
    def reading(self) -> Iterator[Store]:
        """Reads without a write lock (SQLite: no BEGIN IMMEDIATE); whatever was done is rolled back."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        conn, store = self._open()
        try:
            yield store
        finally:
            if conn.is_valid:
                try:
                    conn.rollback()
                except dbapi_error as exc:
                    store.translate(exc, "ROLLBACK")
            conn.close()
