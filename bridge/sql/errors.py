"""The boundary: the driver's and SQLAlchemy's errors become the store's own (`bridge.model`).

StorageError            the statement failed (a bug, bad data): the command is answered `internal`
├── StorageUnavailable  OperationalError, InterfaceError, or any error that lost the connection
└── Conflict            IntegrityError: a uniqueness rule was hit by a concurrent writer

Nothing past this package sees a SQLAlchemy or driver error: `SqlStore.translate` (statements) and
`SqlUnitOfWork` (connect, commit, rollback) raise these. tests/unit/test_storage_errors.py fails when
SQLAlchemy has a DBAPIError subclass missing from TRANSLATION.
"""

from __future__ import annotations

from sqlalchemy.exc import (
    DatabaseError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
)

from ..model import Conflict, StorageError, StorageUnavailable

# The store's errors for SQLAlchemy's wrappers of the PEP 249 exceptions (the driver's, sqlite3 or psycopg,
# are wrapped first, as `Connection.execute` would). A lost connection is StorageUnavailable whatever its
# class.
TRANSLATION: dict[type[DBAPIError], type[StorageError]] = {
    IntegrityError: Conflict,
    OperationalError: StorageUnavailable,  # unreachable, restarting, locked, out of disk
    InterfaceError: StorageUnavailable,  # the connection is unusable
    DataError: StorageError,
    ProgrammingError: StorageError,
    NotSupportedError: StorageError,
    InternalError: StorageError,
    DatabaseError: StorageError,
    DBAPIError: StorageError,
}

# Errors that mean "the database is unreachable": the batch is retried, never answered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailable,)


def storage_error(exc: DBAPIError) -> StorageError:
    """The store's error for SQLAlchemy's."""
    message = str(exc.orig) if exc.orig is not None else str(exc)
    if exc.connection_invalidated:
        return StorageUnavailable(message, connection_lost=True)
    kind = next(TRANSLATION[cls] for cls in type(exc).__mro__ if cls in TRANSLATION)
    return kind(message)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageUnavailable)
