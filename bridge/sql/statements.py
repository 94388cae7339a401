"""Statements: written with SQLAlchemy beside the method that runs them, compiled once per engine.

A store method runs its statement on the driver's cursor, with no SQLAlchemy in between: building,
caching and wrapping a SQLAlchemy statement per call cost 15-50 µs, the SQLite statement itself about
1 (py-spy under bench/throughput.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ClauseElement

# A list of values (an IN list) is padded to the next power of two with its last value (an IN list
# means the same with a value repeated), so that a Listed statement has at most log2(IN_CHUNK) + 1
# compiled lengths; longer lists run in chunks of IN_CHUNK.
IN_CHUNK = 512


class Sql:
    """A statement of the store: `build` is the SQLAlchemy statement, or makes it for the dialect's name
    ("sqlite", "postgresql"); `columns`, for an INSERT or UPDATE, the columns it takes."""

    __slots__ = ("build", "columns")

    def __init__(
        self, build: ClauseElement | Callable[[str], ClauseElement], *, columns: Sequence[str] | None = None
    ) -> None:
        self.build = build
        self.columns = list(columns) if columns is not None else None

    def statement(self, dialect: str) -> ClauseElement:
        return self.build if isinstance(self.build, ClauseElement) else self.build(dialect)


class Listed:
    """A statement over a list of values (an IN list): `build` makes it from the list's bind parameters.
    It is compiled once per padded length of the list, not per call: compiling the expanding IN of
    `without_active_session` for every message was 28 % of the bridge's database CPU."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[BindParameter[Any]]], ClauseElement]) -> None:
        self.build = build


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled for one dialect: what the driver runs."""

    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for drivers with positional parameters
    constants: dict[str, Any]  # values bound in the statement itself, such as a LIMIT 1 or an IN list
    pick: Callable[[dict[str, Any]], tuple[Any, ...]] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def compile(
        cls, stmt: ClauseElement, dialect: Dialect, columns: list[str] | None = None, **kwargs: Any
    ) -> Prepared:
        compiled = cast(
            SQLCompiler, stmt.compile(dialect=dialect, column_keys=columns, compile_kwargs=kwargs)
        )
        positions = tuple(compiled.positiontup or ()) if dialect.positional else None
        binds = compiled.binds
        constants = {  # what the caller passes (required binds, columns of an INSERT/UPDATE) is not here
            key: value
            for key, value in compiled.params.items()
            if value is not None and not (key in binds and binds[key].required)
        }
        return cls(str(compiled), positions, constants, _picker(positions))

    def args(self, params: dict[str, Any]) -> Any:
        if self.constants:
            params = {**self.constants, **params}
        return params if self.pick is None else self.pick(params)


def _picker(positions: tuple[str, ...] | None) -> Callable[[dict[str, Any]], tuple[Any, ...]] | None:
    """The positional parameters from the named ones, picked in C (itemgetter): several times faster
    than a generator over the names, and every statement needs them."""
    if positions is None:
        return None
    if len(positions) == 1:
        name = positions[0]
        return lambda params: (params[name],)
    if not positions:
        return lambda params: ()
    return itemgetter(*positions)


class Statements:
    """The store's statements compiled for one engine's dialect: those `declared` at once (a statement
    that cannot compile fails at start-up), any other on first use, a Listed one per length."""

    def __init__(self, dialect: Dialect, declared: Iterable[Sql] = ()) -> None:
        self.dialect = dialect
        self.compiled: dict[Sql, Prepared] = {}
        self._listed: dict[tuple[Listed, int], Prepared] = {}
        for sql in declared:
            self.compile(sql)

    def compile(self, sql: Sql) -> Prepared:
        found = self.compiled.get(sql)
        if found is None:
            stmt = sql.statement(self.dialect.name)
            found = self.compiled[sql] = Prepared.compile(stmt, self.dialect, sql.columns)
        return found

    def listed(self, listed: Listed, length: int) -> Prepared:
        """The statement over a list of `length` values, bound as i0, i1, ..."""
        found = self._listed.get((listed, length))
        if found is None:
            stmt = listed.build([bindparam(f"i{k}") for k in range(length)])
            found = self._listed[(listed, length)] = Prepared.compile(stmt, self.dialect)
        return found


def declared(cls: type) -> list[Sql]:
    """The statements a class (and its bases) declare as attributes."""
    return [value for klass in cls.__mro__ for value in vars(klass).values() if isinstance(value, Sql)]
