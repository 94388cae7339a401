"""What every part of the SQL store shares: one connection with an open transaction, its cursor, the
statements compiled for its engine, savepoints, and the translation of the driver's errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.expression import ClauseElement

from ..model import StorageError
from .errors import storage_error
from .statements import IN_CHUNK, Listed, Prepared, Sql, Statements


class StoreBase:
    """A store bound to one connection with an open transaction; the parts of SqlStore extend it.

    Statements run on the driver's cursor; the driver's errors leave as the store's (`translate`)."""

    def __init__(self, conn: PoolProxiedConnection, dialect: Dialect, statements: Statements) -> None:
        self.conn = conn
        self.dialect = dialect
        self.q = statements
        self.raw = conn.dbapi_connection
        assert self.raw is not None
        self.cur = self.raw.cursor()
        self._pg = dialect.name == "postgresql"
        self._depth = 0

    def _run(self, sql: str, args: Any = (), *, many: bool = False) -> Any:
        try:
            if many:
                self.cur.executemany(sql, args)
            else:
                self.cur.execute(sql, args)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self.translate(exc, sql, args) from None
        return self.cur

    def translate(self, exc: Any, sql: str = "", args: Any = ()) -> StorageError:
        """The store's error for a driver error (through SQLAlchemy's classification, as
        `Connection.execute` would raise it); a lost connection is dropped from the pool."""
        lost = self.dialect.is_disconnect(exc, self.raw, self.cur)
        if lost:
            self.conn.invalidate(exc)
        wrapped = DBAPIError.instance(
            sql, args, exc, self.dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=self.dialect
        )
        return storage_error(wrapped)

    def flush_search(self) -> None:
        """Writes the rows the search index still waits for (`Search`); before the commit, and before
        any statement on the index."""

    def _exec(self, sql: Sql, /, **params: Any) -> Any:
        q = self.q.compiled.get(sql) or self.q.compile(sql)
        return self._run(q.sql, q.args(params))

    def _many(self, sql: Sql, rows: Sequence[dict[str, Any]]) -> None:
        q = self.q.compiled.get(sql) or self.q.compile(sql)
        self._run(q.sql, [q.args(r) for r in rows], many=True)

    def _listed(
        self, listed: Listed, values: Sequence[str], /, *, rows: bool = True, **params: Any
    ) -> list[Any]:
        """Runs the statement over the distinct `values` (in chunks of IN_CHUNK, each padded to a
        compiled length); the rows of every chunk when `rows`."""
        unique = list(dict.fromkeys(values))
        found: list[Any] = []
        for start in range(0, len(unique), IN_CHUNK):
            chunk = unique[start : start + IN_CHUNK]
            length = 1 << (len(chunk) - 1).bit_length()
            q = self.q.listed(listed, length)
            padded = chunk + [chunk[-1]] * (length - len(chunk))
            cur = self._run(q.sql, q.args({**params, **{f"i{k}": v for k, v in enumerate(padded)}}))
            if rows:
                found.extend(cur.fetchall())
        return found

    def _core(self, stmt: ClauseElement) -> Any:
        """A statement that varies per call in more than a list's length, compiled here."""
        q = Prepared.compile(stmt, self.dialect, render_postcompile=True)
        return self._run(q.sql, q.args({}))

    @contextmanager
    def atomic(self) -> Iterator[None]:
        name = f"sp{self._depth}"
        self._run(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._run(f"ROLLBACK TO SAVEPOINT {name}")
            self._run(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            self._run(f"RELEASE SAVEPOINT {name}")
        finally:
            self._depth -= 1
