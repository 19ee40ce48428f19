"""Lookups with an SQL query, through any DB-API 2.0 module (:pep:`249`).

The keywords of :meth:`~DBAPI2Lookup.lookup` are always passed to the
database as query *parameters*, never formatted into the query text, so an
address cannot change the query.

The DB-API calls block: use a driver that cooperates with gevent (or gevent
monkey patching) for a database on the network. :class:`SQLite3Lookup`
waits for a locked database in short gevent sleeps instead of SQLite's own
blocking busy handler.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import gevent

from slimta.lookup import LookupFailed
from slimta.lookup.drivers._base import LookupBase

__all__ = ["DBAPI2Lookup", "SQLite3Lookup"]

#: SQLite's primary result codes for "another connection holds a lock".
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


class DBAPI2Lookup(LookupBase):
    """Look records up with one query on a DB-API 2.0 connection.

    :param conn_ctxmgr: called with no arguments, gives a context manager
        that yields an open connection and cleans up after it (a pool's
        checkout, say); or ``None`` to use *conn*.
    :param query: the query, with the module's placeholders (``:address``
        or ``%(address)s``; ``?`` or ``%s`` with *query_param_order*).
    :param query_param_order: for positional placeholders, the keywords
        whose values fill them, in order; otherwise the keywords are passed
        as a mapping.
    :param result_order: the keys for the columns of a row returned as a
        sequence; by default the column names of ``cursor.description``.
    :param conn: one connection used for every lookup, when *conn_ctxmgr*
        is ``None``. One connection serves one query at a time: with a
        gevent-cooperative driver, give a pool as *conn_ctxmgr* instead.
    :raises ValueError: neither *conn_ctxmgr* nor *conn* is given.
    """

    def __init__(
        self,
        conn_ctxmgr: Callable[[], AbstractContextManager[Any]] | None,
        query: str,
        query_param_order: Sequence[str] | None = None,
        result_order: Sequence[str] | None = None,
        conn: Any = None,
    ) -> None:
        if conn_ctxmgr is None:
            if conn is None:
                raise ValueError("DBAPI2Lookup needs conn_ctxmgr or conn")
            conn_ctxmgr = _fixed(conn)
        self.conn_ctxmgr = conn_ctxmgr
        self.query = query
        self.query_param_order = list(query_param_order) if query_param_order else None
        self.result_order = list(result_order) if result_order else None

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The first row the query returns for *kwargs*, as a ``dict``.

        :returns: ``None`` when the query returns no row, or when a keyword
            named in *query_param_order* is not given.
        :raises slimta.lookup.LookupFailed: anything the connection, the
            query or the context manager raised (its ``__cause__``).
        """
        ret = self._run(kwargs)
        self.log(__name__, kwargs, ret)
        return ret

    def _run(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        params: Sequence[Any] | Mapping[str, Any]
        if self.query_param_order is not None:
            try:
                params = [kwargs[name] for name in self.query_param_order]
            except KeyError:
                return None
        else:
            params = kwargs
        try:
            return self._query(params)
        except LookupFailed:
            raise
        except Exception as exc:
            raise LookupFailed(f"database lookup failed: {_describe(exc)}") from exc

    def _query(self, params: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any] | None:
        with self.conn_ctxmgr() as conn:
            cursor = conn.cursor()
            try:
                cursor.execute(self.query, params)
                row = cursor.fetchone()
                names = self.result_order
                if names is None and cursor.description is not None:
                    names = [column[0] for column in cursor.description]
            finally:
                # End the read transaction the query may have begun, so the
                # connection does not sit "idle in transaction". A failure
                # here must not hide the query's own error.
                with contextlib.suppress(Exception):
                    cursor.close()
                with contextlib.suppress(Exception):
                    conn.rollback()
        if row is None:
            return None
        if isinstance(row, Mapping):
            return dict(row)
        if names is None or len(names) < len(row):
            raise LookupFailed("database row has columns without names")
        return dict(zip(names, row, strict=False))


def _fixed(conn: Any) -> Callable[[], AbstractContextManager[Any]]:
    @contextlib.contextmanager
    def give() -> Iterator[Any]:
        yield conn

    return give


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class SQLite3Lookup(DBAPI2Lookup):
    """Look records up in an SQLite database file with :mod:`sqlite3`.

    The file is opened read-only for each lookup, so a file replaced by a
    rename is read at once. A missing file is a :class:`LookupFailed`,
    never an empty answer (and never creates the file). A database another
    connection keeps locked is retried in gevent sleeps for *busy_timeout*
    seconds, then is a :class:`LookupFailed`.

    :param database: the database file name.
    :param query: the query, with named placeholders (``name = :localpart``).
    :param busy_timeout: seconds to wait for a locked database.

    .. versionchanged:: 4.0
       Opened read-only per lookup (4.0 kept one connection, created the
       file when missing, and blocked in SQLite's busy handler);
       *busy_timeout* is new.
    """

    #: Seconds between two tries of a locked database (doubling up to 0.1).
    _first_retry_delay = 0.005

    def __init__(
        self, database: str | os.PathLike[str], query: str, *, busy_timeout: float = 1.0
    ) -> None:
        self.database = os.fspath(database)
        self.busy_timeout = busy_timeout
        # A URI, for mode=ro: sqlite3.connect() would create a missing file.
        self._uri = Path(self.database).absolute().as_uri() + "?mode=ro"
        super().__init__(self._connect, query)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # timeout=0: a lock is reported at once, and waited for in lookup()
        # without holding the event loop.
        conn = sqlite3.connect(self._uri, timeout=0, uri=True)
        try:
            yield conn
        finally:
            conn.close()

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The first row the query returns for *kwargs*, as a ``dict``.

        :raises slimta.lookup.LookupFailed: the file is missing or not a
            database, the query is wrong, or the database stayed locked.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = self._first_retry_delay
        while True:
            try:
                ret = self._run(kwargs)
            except LookupFailed as exc:
                if not _is_busy(exc.__cause__) or time.monotonic() >= deadline:
                    raise
                gevent.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
                continue
            self.log(__name__, kwargs, ret)
            return ret


def _is_busy(exc: BaseException | None) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
