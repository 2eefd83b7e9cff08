"""The metadata repository: recordings and ingest failures in Postgres (SQLAlchemy, psycopg 3).

Writes are idempotent (``INSERT … ON CONFLICT DO NOTHING``), so replays and
redeliveries never duplicate a row. Connection-level failures are translated into
:class:`DependencyUnavailable`; anything else from the database is a bug and is raised
as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from fileserver.errors import DependencyUnavailable
from fileserver.models import IngestFailure, Recording

LOOKUP_BATCH = 1000


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
class FailureRow:
    """A row of ``ingest_failures``."""

    id: int
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    reason: str
    detail: str
    source_url: str | None
    payload: bytes | None
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


def _is_connection_error(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError | InterfaceError)


class Repository:
    """Reads and writes fileserver's tables through one async engine (a connection pool)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _execute(self, statement: Any, *, write: bool) -> Any:
        try:
            if write:
                async with self._engine.begin() as conn:
                    return (await conn.execute(statement)).all()
            async with self._engine.connect() as conn:
                return (await conn.execute(statement)).all()
        except DBAPIError as exc:
            if _is_connection_error(exc):
                raise DependencyUnavailable("postgres", str(exc.orig).strip()[:300]) from None
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
        """Insert ``row``; ``False`` when a row with the same ``source_url`` already exists."""
        stmt = (
            insert(Recording)
            .values(**asdict(row))
            .on_conflict_do_nothing(index_elements=["source_url"])
            .returning(Recording.id)
        )
        return bool(await self._execute(stmt, write=True))

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
        rows = await self._execute(
            select(Recording.md5).where(Recording.source_url == source_url), write=False
        )
        return str(rows[0][0]) if rows else None

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
