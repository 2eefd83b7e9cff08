"""The metadata repository: recordings and ingest failures in Postgres (SQLAlchemy, psycopg 3).

Writes are idempotent (``INSERT … ON CONFLICT DO NOTHING``), so replays and
redeliveries never duplicate a row. Connection-level failures and timeouts are
translated into :class:`DependencyUnavailable`; anything else from the database is
raised as it is (a batch that fails that way is run again row by row, so that only the
offending row fails).

Every call has a deadline: libpq's ``connect_timeout``, TCP keepalives and
``tcp_user_timeout`` (a silent link is noticed in seconds, not after ~15 min of TCP
retransmissions), a server-side ``statement_timeout`` (:func:`engine_options`), and a
client-side deadline a little longer than it around every statement
(:class:`~fileserver.db.deadlines.Deadline`), which ends the call even when the
server's answer can no longer reach us.

The machinery lives in :mod:`fileserver.db`: the rows (:mod:`~fileserver.db.rows`), the
batched statements (:mod:`~fileserver.db.statements`), the deadlines and the kept batch
connections (:mod:`~fileserver.db.deadlines`) and the batching of concurrent calls
(:mod:`~fileserver.db.coalescer`). The names other modules import from here are
re-exported (``__all__``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict
from functools import partial
from typing import Any

from sqlalchemy import delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from fileserver.db.coalescer import Coalescer
from fileserver.db.deadlines import (
    DEFAULT_STATEMENT_TIMEOUT_S,
    STATEMENT_TIMEOUT_OPTION,
    Deadline,
    HeldConnection,
    engine_options,
    is_connection_error,
)
from fileserver.db.rows import (
    FailureFilter,
    FailureRow,
    NewFailure,
    NewRecording,
    Prior,
    PriorKey,
    RecordingRef,
    StoredRow,
)
from fileserver.db.statements import (
    INSERT_MANY,
    MD5_BY_URLS,
    PRIOR_OUTCOMES,
    RECORDING_COLUMNS,
    BinaryArray,
    recording_values,
    recordings_by_key_statement,
)
from fileserver.errors import DependencyUnavailable
from fileserver.metrics import Metrics, get_metrics
from fileserver.models import IngestFailure, Recording

__all__ = [
    "DEFAULT_STATEMENT_TIMEOUT_S",
    "LOOKUP_BATCH",
    "STATEMENT_TIMEOUT_OPTION",
    "Coalescer",
    "FailureFilter",
    "FailureRow",
    "NewFailure",
    "NewRecording",
    "Prior",
    "PriorKey",
    "RecordingRef",
    "Repository",
    "StoredRow",
    "engine_options",
]

LOOKUP_BATCH = 1000
#: Rows per statement of :meth:`Repository.recordings_by_key`.
ROW_BATCH = 1000

# The former private names of the batched statements (bench/repository_speed.py).
_BinaryArray = BinaryArray
_INSERT_MANY = INSERT_MANY
_MD5_BY_URLS = MD5_BY_URLS
_RECORDING_COLUMNS = RECORDING_COLUMNS
_recording_values = recording_values


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
        self._deadline = Deadline(statement_timeout_s)
        self._engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._inserts: Coalescer[NewRecording, bool] | None = None
        self._lookups: Coalescer[str, str | None] | None = None
        self._priors: Coalescer[PriorKey, Prior] | None = None
        self._insert_conn = HeldConnection(self._autocommit, self._deadline)  # batched inserts
        self._lookup_conn = HeldConnection(self._autocommit, self._deadline)  # batched look-ups
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
        held: HeldConnection | None = None,
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
            if is_connection_error(exc):
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
        columns = zip(*(recording_values(rows[i]) for i in first.values()), strict=True)
        params = {n: BinaryArray(c) for n, c in zip(RECORDING_COLUMNS, columns, strict=True)}
        result = await self._execute(INSERT_MANY, write=True, params=params, held=self._insert_conn)
        inserted = {str(r[0]) for r in result}
        return [first[r.source_url] == i and r.source_url in inserted for i, r in enumerate(rows)]

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        rows = await self._execute(
            MD5_BY_URLS,
            write=False,
            params={"urls": BinaryArray(dict.fromkeys(urls))},
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
            PRIOR_OUTCOMES,
            write=False,
            params={
                "urls": BinaryArray(urls),
                "topics": BinaryArray(topics),
                "partitions": BinaryArray(partitions),
                "offsets": BinaryArray(offsets),
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

    async def recordings_by_key(
        self, bucket: str, *, batch_rows: int = ROW_BATCH
    ) -> AsyncIterator[RecordingRef]:
        """Every row of ``bucket`` in the order S3 lists keys: ``s3_key`` in byte order
        (``COLLATE "C"``), then ``id``.

        Keyset pagination: each batch of ``batch_rows`` is one short statement
        (autocommit, within the statement timeout) that starts after the last row of the
        previous one and reads the index ``ix_recordings_bucket_key`` in order, so no
        transaction, snapshot or connection is held across the scan, whatever its size.
        A row inserted or deleted during the scan is seen or not depending on where the
        scan is: callers re-check what they find."""
        after: tuple[str, int] | None = None
        while True:
            rows = await self._execute(
                recordings_by_key_statement(bucket, batch_rows, after), write=False
            )
            for r in rows:
                yield RecordingRef(
                    id=int(r.id),
                    source_url=str(r.source_url),
                    md5=str(r.md5).strip().lower(),
                    size_bytes=int(r.size_bytes),
                    uid=int(r.uid),
                    grp_id=int(r.grp_id),
                    event_time=r.event_time,
                    s3_bucket=bucket,
                    s3_key=str(r.s3_key),
                )
            if len(rows) < batch_rows:
                return
            after = (str(rows[-1].s3_key), int(rows[-1].id))

    async def count_recordings_at(self, bucket: str, key: str) -> int:
        """How many rows point at ``key`` in ``bucket``."""
        rows = await self._execute(
            select(func.count())
            .select_from(Recording)
            .where(Recording.s3_bucket == bucket, Recording.s3_key == key),
            write=False,
        )
        return int(rows[0][0])

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
