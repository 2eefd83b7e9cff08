"""Deadlines on every Postgres call: the engine's connection options
(:func:`engine_options`), the client-side deadline around each statement
(:class:`Deadline`) and the connection kept open for batches (:class:`HeldConnection`).

libpq's ``connect_timeout``, TCP keepalives and ``tcp_user_timeout`` notice a silent
link in seconds, not after ~15 min of TCP retransmissions; the server-side
``statement_timeout`` ends a slow statement; the client-side deadline, a little longer
than it, ends the call even when the server's answer can no longer reach us.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fileserver.errors import DependencyUnavailable

DEFAULT_STATEMENT_TIMEOUT_S = 30.0  # FILESERVER_DB_STATEMENT_TIMEOUT_S's default
STATEMENT_TIMEOUT_OPTION = "fileserver_statement_timeout_s"  # engine execution option
DEADLINE_MARGIN_S = 2.0  # for the server's own timeout error to reach us
ABORT_GRACE_S = 5.0  # after the deadline, for the aborted statement to unwind
KEEPALIVE_PROBES = 3

_STATEMENT_TIMEOUT_IN_OPTIONS = re.compile(r"(?:^|\s)(?:-c\s*|--)statement[_-]timeout=(\S*)")
_PG_TIME_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _user_statement_timeout_s(options: str) -> float | None:
    """The ``statement_timeout`` set in a libpq ``options`` string, in seconds: ``None``
    when it sets none, ``0.0`` when it is off or not a value we can read."""
    found = _STATEMENT_TIMEOUT_IN_OPTIONS.findall(options)
    if not found:
        return None
    value = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?", found[-1].strip())
    if value is None:
        return 0.0
    return float(value[1]) * _PG_TIME_UNITS_S[value[2] or "ms"]


def engine_options(
    database_url: str, *, connect_timeout_s: float, statement_timeout_s: float
) -> dict[str, Any]:
    """``create_async_engine`` keywords that give every connection and statement a deadline.

    - ``connect_timeout``: libpq gives up on a host that does not answer.
    - ``keepalives``, ``keepalives_idle``/``_interval``/``_count`` and
      ``tcp_user_timeout``: the kernel declares a silent link dead after about twice
      ``connect_timeout_s`` (idle, or with data unacknowledged), where TCP's default
      retransmissions take ~15 min.
    - ``options=-c statement_timeout=…``: the server cancels a statement running (or
      waiting for a lock) longer than that. Appended to the ``options`` of the URL (or
      ``PGOPTIONS``), which would otherwise be lost; a ``statement_timeout`` there wins.
    - ``pool_timeout``: waiting for a free pooled connection ends too; a slot frees
      within one statement timeout unless the database is stuck.
    - execution option :data:`STATEMENT_TIMEOUT_OPTION`: the effective statement
      timeout, from which :class:`~fileserver.repository.Repository` sets its
      client-side deadline.

    Parameters the URL sets itself are kept as they are (``connect_args`` would
    override them).
    """
    query = make_url(database_url).query
    idle_s = max(1, math.ceil(connect_timeout_s))
    interval_s = max(1, math.ceil(connect_timeout_s / KEEPALIVE_PROBES))
    wanted: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout_s)),  # libpq's minimum is 2
        "keepalives": 1,
        "keepalives_idle": idle_s,
        "keepalives_interval": interval_s,
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": (idle_s + interval_s * KEEPALIVE_PROBES) * 1000,  # ms
    }
    connect_args = {key: value for key, value in wanted.items() if key not in query}
    given = query.get("options")
    options = given if isinstance(given, str) else os.environ.get("PGOPTIONS", "")
    user_timeout_s = _user_statement_timeout_s(options)
    if user_timeout_s is None:
        ms = math.ceil(statement_timeout_s * 1000)
        connect_args["options"] = f"{options} -c statement_timeout={ms}".strip()
    # a timeout the URL turns off (0) still leaves the client-side deadline in place
    timeout_s = user_timeout_s or statement_timeout_s
    return {
        "connect_args": connect_args,
        "pool_timeout": timeout_s,
        "execution_options": {STATEMENT_TIMEOUT_OPTION: timeout_s},
    }


class Deadline:
    """The client-side deadline of the repository's calls: the statement timeout plus
    :data:`DEADLINE_MARGIN_S`, for getting a connection and for running a statement.

    The server's ``statement_timeout`` normally ends a slow statement first (its error
    keeps the connection usable). When that answer cannot reach us (a silent link), the
    connection's socket is shut down at the deadline: libpq reads end-of-file at once
    and the statement fails, the connection is invalidated (never back to the pool) and
    the call raises :class:`DependencyUnavailable`. Shutting the socket rather than
    cancelling the task: on cancellation psycopg sends a cancel request and waits for
    the server (up to 5 + 5 s, then closes), which on a silent link only adds 10 s. A
    pooled connection's checkout (its pre-ping) is bounded by cancellation, so that
    path can take up to those 10 s more.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline_s = timeout_s + DEADLINE_MARGIN_S

    def expired(self, what: str) -> DependencyUnavailable:
        return DependencyUnavailable(
            "postgres",
            f"{what} did not finish within {self.deadline_s:g} s (statement timeout "
            f"{self.timeout_s:g} s, FILESERVER_DB_STATEMENT_TIMEOUT_S, plus "
            f"{DEADLINE_MARGIN_S:g} s); the connection was dropped",
        )

    def describe(self, exc: DBAPIError) -> str:
        """What to say about a connection-level error (naming the setting for a timeout)."""
        detail = str(exc.orig).strip()[:300]
        if isinstance(exc.orig, psycopg.errors.QueryCanceled):
            return (
                f"the server cancelled the statement (statement timeout {self.timeout_s:g} s, "
                f"FILESERVER_DB_STATEMENT_TIMEOUT_S): {detail}"
            )
        return detail

    async def connect(self, engine: AsyncEngine) -> tuple[AsyncConnection, Any]:
        """A connection (from the pool, or a new one) and its psycopg connection."""
        timeout = asyncio.timeout(self.deadline_s)
        try:
            async with timeout:
                conn = await engine.connect()
        except TimeoutError:
            if not timeout.expired():
                raise
            raise self.expired("getting a connection") from None
        except PoolTimeout as exc:
            raise DependencyUnavailable("postgres", f"no free pooled connection: {exc}") from None
        try:
            driver = (await conn.get_raw_connection()).driver_connection
        except BaseException:
            await conn.close()
            raise
        return conn, driver

    async def run(
        self, conn: AsyncConnection, driver: Any, statement: Any, params: dict[str, Any] | None
    ) -> Sequence[Row[Any]]:
        """Run ``statement`` on ``conn``, aborting its socket at the deadline.

        A result that arrives just as the deadline passes is dropped with the
        connection (the socket is gone): every statement here is safe to repeat."""
        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True
            _shut_down(driver)

        timer = asyncio.get_running_loop().call_later(self.deadline_s, abort)
        try:
            # a backstop, should the shut-down socket not end the statement
            async with asyncio.timeout(self.deadline_s + ABORT_GRACE_S):
                rows = (await conn.execute(statement, params)).all()
        except (DBAPIError, TimeoutError):
            if not aborted:
                raise
        finally:
            timer.cancel()
        if aborted:
            with contextlib.suppress(Exception):  # already gone, most likely
                await conn.invalidate()
            raise self.expired("the statement")
        return rows


def _shut_down(driver: Any) -> None:
    """Shut down the socket of psycopg connection ``driver`` (not close: the descriptor
    stays libpq's), so whatever waits on it sees end-of-file now."""
    try:
        sock = socket.socket(fileno=os.dup(driver.pgconn.socket))
    except (OSError, psycopg.Error):  # already closed: nothing waits on it
        return
    with sock, contextlib.suppress(OSError):  # closes our duplicate only
        sock.shutdown(socket.SHUT_RDWR)


class HeldConnection:
    """One autocommit connection kept open for a batching
    :class:`~fileserver.db.coalescer.Coalescer`.

    A batch then costs one round trip, without the pool's checkout and pre-ping (one
    more round trip) per statement. On a connection error or a timeout the connection
    is dropped (closed in the background) and the next statement opens a new one; a
    statement refused for its data (``DataError``, …) leaves it idle and usable
    (autocommit: nothing to roll back), so re-running a batch row by row costs no
    reconnections.

    A kept connection can die while idle (server restart, ``pg_terminate_backend``, a
    silent link that the TCP keepalives declared dead): its next statement fails as a
    disconnect. Rule: when a statement on a *reused* connection fails as a disconnect,
    it is run once more on a new connection, so such a death costs no batch; if that
    fails too, or the connection was new, the error is raised (an outage, which the
    processor retries). Repeating is safe: the inserts are ``ON CONFLICT DO NOTHING``
    (a row that did get in before the disconnect is then reported as already there)
    and the look-ups are reads. A statement that timed out (the server's
    ``statement_timeout`` or the client-side deadline) is not repeated: it would only
    double the wait; its connection is dropped and the timeout raised.
    """

    def __init__(self, engine: AsyncEngine, deadline: Deadline) -> None:
        self._engine = engine
        self._deadline = deadline
        self._conn: AsyncConnection | None = None
        self._driver: Any = None  # self._conn's psycopg connection
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    async def execute(self, statement: Any, params: dict[str, Any] | None) -> Sequence[Row[Any]]:
        async with self._lock:
            reused = self._conn is not None
            try:
                return await self._execute_once(statement, params)
            except DBAPIError as exc:
                if not is_connection_error(exc):
                    raise
                self._drop()
                if not (reused and exc.connection_invalidated):
                    raise
            except BaseException:
                self._drop()
                raise
            try:  # the kept connection had died: once more, on a new one
                return await self._execute_once(statement, params)
            except BaseException:
                self._drop()
                raise

    async def _execute_once(
        self, statement: Any, params: dict[str, Any] | None
    ) -> Sequence[Row[Any]]:
        if self._conn is None:
            self._conn, self._driver = await self._deadline.connect(self._engine)
        return await self._deadline.run(self._conn, self._driver, statement, params)

    def _drop(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            task = asyncio.get_running_loop().create_task(_close_quietly(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Drop the connection without waiting for a statement in flight (shutdown must
        not hang on a database that stopped answering), then give the close a moment."""
        self._drop()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=timeout_s)


async def _close_quietly(conn: AsyncConnection) -> None:
    """Invalidate (never back to the pool: its state is unknown), then release the slot."""
    for step in (conn.invalidate, conn.close):
        try:
            await step()
        except Exception:  # the server may be gone: nothing more to release
            continue


#: SQLSTATE classes and codes of the server's own state rather than the statement's data:
#: connection (08), transaction rollback (40: serialization, deadlock), resources (53:
#: disk full, too many connections), operator intervention (57), system (58), a
#: read-only server during a failover (25006), and privileges or schema changed under
#: the worker (42501, 42P01, 42703). Every event would fail the same way until the
#: server or an operator fixes it: an outage (intake paused, retried), never one event's
#: ``internal_error``.
_OUTAGE_CLASSES = ("08", "40", "53", "57", "58")
_OUTAGE_CODES = frozenset({"25006", "42501", "42P01", "42703", "55P03"})


def is_connection_error(exc: DBAPIError) -> bool:
    """Connection lost or unusable, the statement cancelled (timeout), or the server in a
    state that refuses every statement for now: not the data's fault, so the same call
    may succeed later."""
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    return sqlstate in _OUTAGE_CODES or sqlstate[:2] in _OUTAGE_CLASSES
