"""The metadata repository: recordings and ingest failures in Postgres (SQLAlchemy, psycopg 3).

Writes are idempotent (``INSERT … ON CONFLICT DO NOTHING``), so replays and
redeliveries never duplicate a row. Connection-level failures and timeouts are
translated into :class:`DependencyUnavailable`; anything else from the database is
raised as it is (a batch that fails that way is run again row by row, so that only the
offending row fails).

Every call has a deadline: libpq's ``connect_timeout``, TCP keepalives and
``tcp_user_timeout`` (a silent link is noticed in seconds, not after ~15 min of TCP
retransmissions), a server-side ``statement_timeout`` (:func:`engine_options`), and a
client-side deadline a little longer than it around every statement (:class:`_Deadline`),
which ends the call even when the server's answer can no longer reach us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import partial
from operator import attrgetter
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import (
    String,
    Text,
    bindparam,
    cast,
    delete,
    func,
    literal_column,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fileserver.errors import DependencyUnavailable
from fileserver.metrics import Metrics, get_metrics
from fileserver.models import IngestFailure, Recording

log = logging.getLogger(__name__)

LOOKUP_BATCH = 1000
K = TypeVar("K")
R = TypeVar("R")


class Coalescer(Generic[K, R]):
    """Groups concurrent single-item calls into batched calls (natural batching).

    :meth:`call` queues its item; while fewer than ``max_flushes`` batches are being
    written, a flusher takes every queued item (up to ``max_items``) and hands them to
    ``run`` in one call, so items that arrive while a batch is in flight form the next
    one. Each caller still awaits its own result, and an exception from ``run`` is
    raised to every caller of that batch (nothing is reported done that is not).

    ``isolate(exc)`` true: ``exc`` may be one item's fault (a value the database
    refuses), so the batch is run again one item at a time and only the items that fail
    on their own get an error; one bad event must not fail the ~100 others batched with
    it. Any other error (an outage, a timeout) fails the whole batch at once: every item
    would fail alike, and a hundred single retries would only multiply the wait. It
    lives here, not in the statements, because only here does each caller have its own
    future to receive its own outcome.

    One flusher by default: at ~500 events/s a second one halved the batch sizes and
    cost ~20% of the worker's throughput in per-statement overhead (``python -m bench``).

    ``linger_s`` > 0: before taking a batch that is not full, the flusher waits up to
    that long for more items (a full queue ends the wait at once). A statement costs
    ~0.3 ms of client CPU whatever its size (``python -m bench.repository_speed``), so
    a few milliseconds of latency buy batches several times larger under load.
    """

    def __init__(
        self,
        run: Callable[[list[K]], Awaitable[Sequence[R]]],
        *,
        max_items: int = 100,
        max_flushes: int = 1,
        linger_s: float = 0.0,
        on_batch: Callable[[int], object] | None = None,
        isolate: Callable[[Exception], bool] | None = None,
    ) -> None:
        """``on_batch`` is told the size of every batch before it runs (metrics; the
        single-item re-runs of a failed batch are not reported again)."""
        self._run = run
        self._on_batch = on_batch
        self._isolate = isolate
        self._max_items = max_items
        self._max_flushes = max_flushes
        self._linger_s = linger_s
        self._full: asyncio.Future[None] | None = None  # set while a flusher lingers
        self._queue: list[tuple[K, asyncio.Future[R]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def call(self, item: K) -> R:
        """Queue ``item``; return its result once its batch has run."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        full = self._full
        if full is not None and len(self._queue) >= self._max_items and not full.done():
            full.set_result(None)
        # A flusher that has finished may still be in the set (its done callback runs
        # later): count only running ones, or a caller that retries right after its
        # batch failed would queue behind no flusher at all.
        if sum(not task.done() for task in self._flushers) < self._max_flushes:
            task = asyncio.create_task(self._flush(), name="repository batch")
            self._flushers.add(task)
            task.add_done_callback(self._flusher_done)
        return await future

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        """A flusher cancelled (shutdown), even before it started, leaves its queue to
        nobody: cancel those calls rather than let them wait forever."""
        self._flushers.discard(task)
        if task.cancelled() and all(t.done() for t in self._flushers):
            queued, self._queue = self._queue, []
            for _item, fut in queued:
                fut.cancel()

    async def _flush(self) -> None:
        while self._queue:
            if self._linger_s > 0 and len(self._queue) < self._max_items:
                await self._linger()
            batch = self._queue[: self._max_items]
            del self._queue[: self._max_items]
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await self._run([item for item, _fut in live])
            except Exception as exc:
                isolate = self._isolate
                if isolate is None or len(live) == 1 or not isolate(exc):
                    _fail(live, exc)
                    continue
                log.warning(
                    "a batch of %s failed (%s: %s); running its items one at a time",
                    len(live),
                    type(exc).__name__,
                    str(exc).strip().split("\n", 1)[0][:200],
                )
                await self._one_at_a_time(live, isolate)
                continue
            except BaseException as exc:
                _fail(live, exc)
                raise
            for (_item, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _one_at_a_time(
        self, live: list[tuple[K, asyncio.Future[R]]], isolate: Callable[[Exception], bool]
    ) -> None:
        """Run each item of a failed batch alone; the first error that is not an item's
        own (an outage) fails the items not yet run with it, without trying them."""
        for index, (item, fut) in enumerate(live):
            if fut.done():  # its caller gave up meanwhile
                continue
            try:
                (result,) = await self._run([item])
            except Exception as exc:
                if isolate(exc):
                    fut.set_exception(exc)
                    continue
                _fail(live[index:], exc)
                return
            except BaseException as exc:
                _fail(live[index:], exc)
                raise
            fut.set_result(result)

    async def _linger(self) -> None:
        """Wait ``linger_s``, or less if the queue fills up."""
        loop = asyncio.get_running_loop()
        self._full = full = loop.create_future()
        timer = loop.call_later(self._linger_s, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(calls: Sequence[tuple[object, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _item, fut in calls:
        if not fut.done():
            fut.set_exception(exc)


@dataclass(frozen=True)
class NewRecording:
    """A row to insert into ``recordings``."""

    uid: int
    grp_id: int
    m_type: str
    source_url: str
    source_ip: str | None
    event_time: datetime
    md5: str
    size_bytes: int
    duration_ms: int
    bitrate: int
    sample_rate: int
    channels: int
    s3_bucket: str
    s3_key: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int


@dataclass(frozen=True)
class NewFailure:
    """A row to insert into ``ingest_failures``."""

    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    reason: str
    detail: str
    source_url: str | None
    payload: bytes | None


@dataclass(frozen=True)
class FailureRow(NewFailure):
    """A row of ``ingest_failures``."""

    id: int
    failed_at: datetime


@dataclass(frozen=True)
class FailureFilter:
    """Which dead letters to select (every field optional)."""

    reasons: tuple[str, ...] = ()
    topic: str | None = None
    partitions: tuple[int, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None


@dataclass(frozen=True)
class StoredRow:
    """What ``backfill --verify`` compares: a recording row's content and object."""

    md5: str
    size_bytes: int
    s3_bucket: str
    s3_key: str


class _BinaryArray(list[Any]):
    """A list that psycopg sends as a binary array.

    psycopg's default (text) list dumper quotes every element in Python (a regex search
    each); its binary one only length-prefixes them. Registered for this private class
    alone, so no other list anywhere changes how it is sent.
    """


psycopg.adapters.register_dumper(_BinaryArray, ListBinaryDumper)

_RECORDING_COLUMNS = tuple(f.name for f in fields(NewRecording))
_recording_values: Callable[[NewRecording], tuple[Any, ...]] = attrgetter(*_RECORDING_COLUMNS)


def _array_param(name: str, column: Any) -> Any:
    """``CAST(:name AS type[])``: a bind parameter holding an array of ``column``'s values.

    Strings are cast to ``TEXT[]`` (not ``CHAR(32)[]``, which would silently truncate),
    so storing them applies the column's own checks, as a plain ``INSERT`` does. The
    parameter itself is untyped: SQLAlchemy passes the :class:`_BinaryArray` through.
    """
    element = Text() if isinstance(column.type, String) else column.type
    return cast(bindparam(name), ARRAY(element, dimensions=1))


def _insert_many_statement() -> Any:
    """``INSERT … SELECT … FROM unnest(:uid, :grp_id, …) ON CONFLICT (source_url) DO
    NOTHING RETURNING source_url``: any number of rows, one array parameter per column.

    Built once: SQLAlchemy compiles it once (a compiled-cache hit per batch after that)
    and psycopg sends the same 17 parameters whatever the batch size (prepared once
    executed ``prepare_threshold`` times), where a multi-row ``VALUES`` has a bind
    parameter per value, coerced and compiled anew for every batch.
    """
    table = Recording.__table__
    source = (
        func.unnest(*(_array_param(name, table.c[name]) for name in _RECORDING_COLUMNS))
        .table_valued(*_RECORDING_COLUMNS)
        .render_derived()
    )
    return (
        insert(Recording)
        .from_select(list(_RECORDING_COLUMNS), select(*(source.c[n] for n in _RECORDING_COLUMNS)))
        .on_conflict_do_nothing(index_elements=["source_url"])
        .returning(Recording.source_url)
    )


_INSERT_MANY = _insert_many_statement()


def _md5_by_urls_statement() -> Any:
    """``SELECT url, md5 FROM unnest(:urls) AS wanted(url) JOIN LATERAL (SELECT md5 FROM
    recordings WHERE source_url = url LIMIT 1) ON true``: one array parameter for any
    number of URLs, where an expanding ``IN`` binds (and SQLAlchemy renders) one per URL.

    The lateral ``LIMIT 1`` subquery makes the plan a unique-index probe per URL, also
    when planned on a new, empty table. The plainer ``source_url = ANY(:urls)`` is not
    safe once psycopg prepares it (after ``prepare_threshold`` runs): Postgres then
    plans it generically, for "10 URLs", which on a new, still small table is a
    sequential scan, and keeps that plan while the table grows, until the next ANALYZE
    of it (measured: 45 ms instead of 0.3 ms per look-up of 100 URLs at 50,000 rows).
    """
    wanted = (
        func.unnest(_array_param("urls", Recording.__table__.c.source_url))
        .table_valued("url")
        .render_derived(name="wanted")
    )
    found = (
        select(Recording.md5)
        .where(Recording.source_url == wanted.c.url)
        .limit(literal_column("1"))
        .lateral("found")
    )
    return select(wanted.c.url, found.c.md5).join_from(wanted, found, true())


_MD5_BY_URLS = _md5_by_urls_statement()

_PRIOR_OUTCOMES = text(
    """
    SELECT w.i, r.md5, f.id IS NOT NULL
    FROM unnest(CAST(:urls AS TEXT[]), CAST(:topics AS TEXT[]),
                CAST(:partitions AS INTEGER[]), CAST(:offsets AS BIGINT[]))
         WITH ORDINALITY AS w(url, topic, part, off, i)
    LEFT JOIN LATERAL (SELECT md5 FROM recordings WHERE source_url = w.url LIMIT 1) AS r
         ON true
    LEFT JOIN LATERAL (SELECT id FROM ingest_failures WHERE kafka_topic = w.topic
                       AND kafka_partition = w.part AND kafka_offset = w.off LIMIT 1) AS f
         ON true
    """
)
"""One probe of each unique index per event (``recordings.source_url`` and the failure
row's position), for any number of events, in one statement; lateral ``LIMIT 1``
subqueries for the same reason as :data:`_MD5_BY_URLS`."""


@dataclass(frozen=True)
class Prior:
    """What the tables already hold for one event: the md5 of the recording from its
    source URL, and whether its Kafka position already has a failure row."""

    md5: str | None
    failed: bool


#: (source_url, topic, partition, offset)
PriorKey = tuple[str, str, int, int]


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
      timeout, from which :class:`Repository` sets its client-side deadline.

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


class _Deadline:
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


class _HeldConnection:
    """One autocommit connection kept open for a batching :class:`Coalescer`.

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

    def __init__(self, engine: AsyncEngine, deadline: _Deadline) -> None:
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
                if not _is_connection_error(exc):
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


def _is_connection_error(exc: DBAPIError) -> bool:
    """Connection lost or unusable, or the statement cancelled (timeout): not the data's
    fault, so the same call may succeed later."""
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError | InterfaceError)


def _is_row_error(exc: Exception) -> bool:
    """An error of a statement that may be one row's fault (``DataError`` for a NUL
    character or a value out of range, ``IntegrityError``, …). By the time it reaches the
    :class:`Coalescer`, connection errors and timeouts are :class:`DependencyUnavailable`."""
    return isinstance(exc, StatementError)


class Repository:
    """Reads and writes fileserver's tables through one async engine (a connection pool)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_rows: int = 0,
        batch_linger_s: float = 0.0,
        metrics: Metrics | None = None,
        statement_timeout_s: float | None = None,
    ) -> None:
        """``batch_rows`` > 1 groups concurrent :meth:`insert_recording` and
        :meth:`recording_md5` calls into one statement each (up to that many rows),
        each waiting up to ``batch_linger_s`` for a fuller batch; batch sizes go to
        ``fileserver_db_batch_rows``.

        ``statement_timeout_s`` sets the client-side deadline (that plus
        :data:`DEADLINE_MARGIN_S`); by default the server-side one of an engine built
        with :func:`engine_options`, else :data:`DEFAULT_STATEMENT_TIMEOUT_S`."""
        metrics = metrics or get_metrics()
        if statement_timeout_s is None:
            statement_timeout_s = float(
                engine.get_execution_options().get(
                    STATEMENT_TIMEOUT_OPTION, DEFAULT_STATEMENT_TIMEOUT_S
                )
            )
        self._deadline = _Deadline(statement_timeout_s)
        self._engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._inserts: Coalescer[NewRecording, bool] | None = None
        self._lookups: Coalescer[str, str | None] | None = None
        self._priors: Coalescer[PriorKey, Prior] | None = None
        self._insert_conn = _HeldConnection(self._autocommit, self._deadline)  # batched inserts
        self._lookup_conn = _HeldConnection(self._autocommit, self._deadline)  # batched look-ups
        if batch_rows > 1:
            self._inserts = Coalescer(
                self._insert_recordings,
                max_items=batch_rows,
                linger_s=batch_linger_s,
                on_batch=partial(metrics.db_batch, "insert"),
                isolate=_is_row_error,
            )
            self._lookups = Coalescer(
                self._recording_md5s,
                max_items=batch_rows,
                linger_s=batch_linger_s,
                on_batch=partial(metrics.db_batch, "lookup"),
                isolate=_is_row_error,
            )
            self._priors = Coalescer(
                self._prior_outcomes,
                max_items=batch_rows,
                linger_s=batch_linger_s,
                on_batch=partial(metrics.db_batch, "lookup"),
                isolate=_is_row_error,
            )

    async def close(self) -> None:
        """Close the connections held for batches (the engine's pool is the caller's)."""
        for held in (self._insert_conn, self._lookup_conn):
            await held.close()

    async def _execute(
        self,
        statement: Any,
        *,
        write: bool,
        params: dict[str, Any] | None = None,
        held: _HeldConnection | None = None,
    ) -> Any:
        """Run one statement in autocommit mode: a single statement is atomic, and it is
        committed when this returns, without BEGIN / COMMIT / ROLLBACK round trips.
        ``held``: on that kept-open connection instead of one from the pool. Getting the
        connection and running the statement each have the client-side deadline."""
        del write  # every statement here is a single one: atomic and durable on return
        try:
            if held is not None:
                return await held.execute(statement, params)
            conn, driver = await self._deadline.connect(self._autocommit)
            try:
                return await self._deadline.run(conn, driver, statement, params)
            finally:
                await conn.close()
        except DBAPIError as exc:
            if _is_connection_error(exc):
                raise DependencyUnavailable("postgres", self._deadline.describe(exc)) from None
            raise
        except OSError as exc:
            raise DependencyUnavailable("postgres", str(exc)) from None

    async def ping(self) -> None:
        """Raise :class:`DependencyUnavailable` unless the database answers."""
        await self._execute(text("SELECT 1"), write=False)

    async def check_schema(self) -> None:
        """Raise ``ProgrammingError`` when the tables are missing (migrations not run)."""
        await self._execute(text("SELECT 1 FROM recordings, ingest_failures LIMIT 0"), write=False)

    async def insert_recording(self, row: NewRecording) -> bool:
        """Insert ``row``; ``False`` when a row with the same ``source_url`` already exists.

        Returns only once the row is committed (batched with concurrent calls when
        ``batch_rows`` is set: one multi-row ``INSERT … ON CONFLICT DO NOTHING``)."""
        if self._inserts is not None:
            return await self._inserts.call(row)
        stmt = (
            insert(Recording)
            .values(**asdict(row))
            .on_conflict_do_nothing(index_elements=["source_url"])
            .returning(Recording.id)
        )
        return bool(await self._execute(stmt, write=True))

    async def _insert_recordings(self, rows: list[NewRecording]) -> list[bool]:
        """One multi-row insert; for each row, whether it was inserted (first wins)."""
        if not rows:
            return []
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row.source_url, i)
        # one array per column (``unnest`` zips them back into rows)
        columns = zip(*(_recording_values(rows[i]) for i in first.values()), strict=True)
        params = {n: _BinaryArray(c) for n, c in zip(_RECORDING_COLUMNS, columns, strict=True)}
        result = await self._execute(
            _INSERT_MANY, write=True, params=params, held=self._insert_conn
        )
        inserted = {str(r[0]) for r in result}
        return [first[r.source_url] == i and r.source_url in inserted for i, r in enumerate(rows)]

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        rows = await self._execute(
            _MD5_BY_URLS,
            write=False,
            params={"urls": _BinaryArray(dict.fromkeys(urls))},
            held=self._lookup_conn,
        )
        found = {str(url): str(md5) for url, md5 in rows}
        return [found.get(url) for url in urls]

    async def prior_outcome(
        self, source_url: str, topic: str, partition: int, offset: int
    ) -> Prior:
        """What is already recorded for the event from ``source_url`` read at that
        position: the worker's one look-up per event before it downloads anything
        (batched with concurrent calls when ``batch_rows`` is set)."""
        key = (source_url, topic, partition, offset)
        if self._priors is not None:
            return await self._priors.call(key)
        (prior,) = await self._prior_outcomes([key])
        return prior

    async def _prior_outcomes(self, keys: list[PriorKey]) -> list[Prior]:
        urls, topics, partitions, offsets = zip(*keys, strict=True)
        rows = await self._execute(
            _PRIOR_OUTCOMES,
            write=False,
            params={
                "urls": _BinaryArray(urls),
                "topics": _BinaryArray(topics),
                "partitions": _BinaryArray(partitions),
                "offsets": _BinaryArray(offsets),
            },
            held=self._lookup_conn,
        )
        found = {
            int(i): Prior(None if md5 is None else str(md5), bool(failed))
            for i, md5, failed in rows
        }
        return [found[i] for i in range(1, len(keys) + 1)]

    async def insert_failure(self, row: NewFailure) -> bool:
        """Insert ``row``; ``False`` when that topic/partition/offset already failed."""
        stmt = (
            insert(IngestFailure)
            .values(**asdict(row))
            .on_conflict_do_nothing(constraint="uq_ingest_failures_source")
            .returning(IngestFailure.id)
        )
        return bool(await self._execute(stmt, write=True))

    async def has_failure(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the event at that position already has a failure row."""
        stmt = select(IngestFailure.id).where(
            IngestFailure.kafka_topic == topic,
            IngestFailure.kafka_partition == partition,
            IngestFailure.kafka_offset == offset,
        )
        return bool(await self._execute(stmt, write=False))

    async def list_failures(self, where: FailureFilter) -> list[FailureRow]:
        """Dead letters matching ``where``, oldest first."""
        stmt = select(IngestFailure.__table__).order_by(IngestFailure.id)
        if where.reasons:
            stmt = stmt.where(IngestFailure.reason.in_(where.reasons))
        if where.topic is not None:
            stmt = stmt.where(IngestFailure.kafka_topic == where.topic)
        if where.partitions:
            stmt = stmt.where(IngestFailure.kafka_partition.in_(where.partitions))
        if where.since is not None:
            stmt = stmt.where(IngestFailure.failed_at >= where.since)
        if where.until is not None:
            stmt = stmt.where(IngestFailure.failed_at < where.until)
        if where.limit is not None:
            stmt = stmt.limit(where.limit)
        rows = await self._execute(stmt, write=False)
        return [FailureRow(**row._mapping) for row in rows]

    async def delete_failure(self, failure_id: int) -> None:
        """Remove a dead letter (its event now has a row)."""
        await self._execute(
            delete(IngestFailure).where(IngestFailure.id == failure_id).returning(IngestFailure.id),
            write=True,
        )

    async def update_failure(self, failure_id: int, reason: str, detail: str) -> None:
        """Record a dead letter's newest reason after it failed again."""
        await self._execute(
            update(IngestFailure)
            .where(IngestFailure.id == failure_id)
            .values(reason=reason, detail=detail, failed_at=func.now())
            .returning(IngestFailure.id),
            write=True,
        )

    async def recording_md5(self, source_url: str) -> str | None:
        """The md5 of the recording ingested from ``source_url``, if there is one."""
        if self._lookups is not None:
            return await self._lookups.call(source_url)
        rows = await self._execute(
            select(Recording.md5).where(Recording.source_url == source_url), write=False
        )
        return str(rows[0][0]) if rows else None

    async def recording_row(self, source_url: str) -> StoredRow | None:
        """The content and object of the row ingested from ``source_url``, if any."""
        rows = await self._execute(
            select(
                Recording.md5, Recording.size_bytes, Recording.s3_bucket, Recording.s3_key
            ).where(Recording.source_url == source_url),
            write=False,
        )
        if not rows:
            return None
        md5, size, bucket, key = rows[0]
        return StoredRow(str(md5).strip(), int(size), str(bucket), str(key))

    async def failed_positions(
        self, topic: str, positions: Iterable[tuple[int, int]]
    ) -> set[tuple[int, int]]:
        """The ``(partition, offset)`` pairs of ``topic`` that have a failure row, batched."""
        wanted = list(dict.fromkeys(positions))
        found: set[tuple[int, int]] = set()
        pair = tuple_(IngestFailure.kafka_partition, IngestFailure.kafka_offset)
        for start in range(0, len(wanted), LOOKUP_BATCH):
            batch = wanted[start : start + LOOKUP_BATCH]
            rows = await self._execute(
                select(IngestFailure.kafka_partition, IngestFailure.kafka_offset).where(
                    IngestFailure.kafka_topic == topic, pair.in_(batch)
                ),
                write=False,
            )
            found.update((int(r[0]), int(r[1])) for r in rows)
        return found

    async def existing_source_urls(self, urls: Iterable[str]) -> set[str]:
        """The subset of ``urls`` that already have a row, in batched look-ups."""
        wanted = list(dict.fromkeys(urls))
        found: set[str] = set()
        for start in range(0, len(wanted), LOOKUP_BATCH):
            batch = wanted[start : start + LOOKUP_BATCH]
            rows = await self._execute(
                select(Recording.source_url).where(Recording.source_url.in_(batch)), write=False
            )
            found.update(str(r[0]) for r in rows)
        return found
