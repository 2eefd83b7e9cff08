"""The read queries of ``fileserver serve``: recordings listed newest first, one
recording, the talk groups.

Lists are keyset-paginated on ``(event_time, id)``, newest first: a page is "the next
``limit`` rows strictly older than the last one seen", so a row inserted while a client
pages is never returned twice and never makes it skip a row (a new burst newer than the
first page shows up on a fresh first page; a late one older than the position is met
in the pages still to come). Each filter has its index (migration 0003):

* ``grp_id`` (with or without ``uid``, time range, ``empty``): ``ix_recordings_grp_time``
  ``(grp_id, event_time DESC, id DESC)``;
* ``uid``: ``ix_recordings_uid_time`` ``(uid, event_time DESC, id DESC)``;
* neither: ``ix_recordings_time`` ``(event_time DESC, id DESC)``.

Each page is then one index range scan read in order, stopped after ``limit + 1``
rows, whatever the table's size (``tests/integration/test_list_plan.py`` shows the
plans at 1 M rows). ``empty`` is a filter on the rows that scan meets.

The analysis columns (``empty`` and the levels of migration 0003) are read when the
database has them: :meth:`Reads.load_columns` looks at the table once at start, so
``serve`` runs against a database before and after that migration (restart it after
migrating). Every statement runs in autocommit with the repository's deadlines
(:class:`~fileserver.db.deadlines.Deadline`); outages are :class:`DependencyUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, column, literal, select, text, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import BigInteger, DateTime

from fileserver.db.deadlines import (
    DEFAULT_STATEMENT_TIMEOUT_S,
    STATEMENT_TIMEOUT_OPTION,
    Deadline,
    is_connection_error,
)
from fileserver.errors import DependencyUnavailable
from fileserver.models import Recording

#: The columns every recording has (migrations 0001-0002), in the order shown.
BASE_COLUMNS = (
    "id",
    "uid",
    "grp_id",
    "event_time",
    "duration_ms",
    "size_bytes",
    "md5",
    "m_type",
    "bitrate",
    "sample_rate",
    "channels",
    "source_ip",
    "s3_bucket",
    "s3_key",
    "ingested_at",
)
#: Columns never shown by the API (where the event was read, the gateway's URL).
HIDDEN_COLUMNS = frozenset({"source_url", "kafka_topic", "kafka_partition", "kafka_offset"})
MAX_TALK_GROUPS = 1000


@dataclass(frozen=True)
class RecordingFilter:
    """Which recordings to list (every field optional); ``until`` is exclusive."""

    grp_id: int | None = None
    uid: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    empty: bool | None = None


@dataclass(frozen=True)
class Position:
    """Where a page ended: the last row's ``(event_time, id)``."""

    event_time: datetime
    id: int


@dataclass(frozen=True)
class RecordingView:
    """A recording as ``serve`` shows it; ``analysis`` holds the columns a later migration
    added (``empty``, levels, …), ``empty`` is ``None`` before migration 0003."""

    id: int
    uid: int
    grp_id: int
    event_time: datetime
    duration_ms: int
    size_bytes: int
    md5: str
    m_type: str
    bitrate: int
    sample_rate: int
    channels: int
    source_ip: str | None
    s3_bucket: str
    s3_key: str
    ingested_at: datetime
    empty: bool | None = None
    analysis: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> Position:
        return Position(self.event_time, self.id)


def _col(name: str) -> Any:
    attr = getattr(Recording, name, None)
    return attr if attr is not None else column(name)


def list_statement(
    where: RecordingFilter,
    limit: int,
    after: Position | None,
    *,
    extra_columns: Sequence[str] = (),
) -> Any:
    """One page: the rows matching ``where`` strictly older than ``after``, newest first,
    at most ``limit`` of them. ``extra_columns``: the analysis columns to read too (and
    ``empty`` must be one of them to filter on it)."""
    cols = [_col(n) for n in BASE_COLUMNS] + [column(n) for n in extra_columns]
    stmt = select(*cols).select_from(Recording.__table__)
    if where.grp_id is not None:
        stmt = stmt.where(Recording.grp_id == where.grp_id)
    if where.uid is not None:
        stmt = stmt.where(Recording.uid == where.uid)
    if where.since is not None:
        stmt = stmt.where(Recording.event_time >= where.since)
    if where.until is not None:
        stmt = stmt.where(Recording.event_time < where.until)
    if where.empty is not None:
        if "empty" not in extra_columns:
            raise ValueError("the database has no column `empty` (migration 0003)")
        flag = column("empty", Boolean)
        stmt = stmt.where(flag.is_(True) if where.empty else flag.is_not(True))
    if after is not None:
        # a row comparison: the index's own order, an index condition (not a filter)
        stmt = stmt.where(
            tuple_(Recording.event_time, Recording.id)
            < tuple_(
                literal(after.event_time, DateTime(timezone=True)),
                literal(after.id, BigInteger),
            )
        )
    return stmt.order_by(Recording.event_time.desc(), Recording.id.desc()).limit(limit)


def one_statement(recording_id: int, *, extra_columns: Sequence[str] = ()) -> Any:
    cols = [_col(n) for n in BASE_COLUMNS] + [column(n) for n in extra_columns]
    return select(*cols).select_from(Recording.__table__).where(Recording.id == recording_id)


#: The talk groups, by a loose index scan of ``ix_recordings_grp_time`` (one index
#: probe per group, not a read of every row), with each group's newest burst.
TALK_GROUPS = text(
    """
    WITH RECURSIVE g(grp_id) AS (
        (SELECT grp_id FROM recordings ORDER BY grp_id LIMIT 1)
        UNION ALL
        SELECT (SELECT r.grp_id FROM recordings r WHERE r.grp_id > g.grp_id
                ORDER BY r.grp_id LIMIT 1)
        FROM g WHERE g.grp_id IS NOT NULL
    )
    SELECT g.grp_id,
           (SELECT max(r.event_time) FROM recordings r WHERE r.grp_id = g.grp_id) AS newest
    FROM g WHERE g.grp_id IS NOT NULL LIMIT :limit
    """
)

#: The columns of ``recordings`` this database has.
TABLE_COLUMNS = text(
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'recordings' ORDER BY ordinal_position"
)


class Reads:
    """The read side of ``recordings`` through one async engine (a connection pool)."""

    def __init__(self, engine: AsyncEngine, *, statement_timeout_s: float | None = None) -> None:
        if statement_timeout_s is None:
            statement_timeout_s = float(
                engine.get_execution_options().get(
                    STATEMENT_TIMEOUT_OPTION, DEFAULT_STATEMENT_TIMEOUT_S
                )
            )
        self._deadline = Deadline(statement_timeout_s)
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.extra_columns: tuple[str, ...] = ()

    async def _execute(self, statement: Any, params: dict[str, Any] | None = None) -> Any:
        try:
            conn, driver = await self._deadline.connect(self._engine)
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
        await self._execute(text("SELECT 1"))

    async def load_columns(self) -> tuple[str, ...]:
        """Find the analysis columns (any column beyond the base ones); raises
        ``LookupError`` when the table is missing (migrations not run)."""
        rows = await self._execute(TABLE_COLUMNS)
        names = [str(r[0]) for r in rows]
        if not names:
            raise LookupError("the database has no table `recordings`: run `fileserver migrate`")
        known = set(BASE_COLUMNS) | HIDDEN_COLUMNS
        self.extra_columns = tuple(n for n in names if n not in known)
        return self.extra_columns

    @property
    def has_empty(self) -> bool:
        return "empty" in self.extra_columns

    def _view(self, row: Any) -> RecordingView:
        m = row._mapping
        analysis = {n: m[n] for n in self.extra_columns}
        empty = analysis.get("empty")
        return RecordingView(
            **{n: m[n] for n in BASE_COLUMNS},
            empty=None if empty is None else bool(empty),
            analysis=analysis,
        )

    async def list_recordings(
        self, where: RecordingFilter, limit: int, after: Position | None = None
    ) -> list[RecordingView]:
        """Up to ``limit`` recordings matching ``where`` older than ``after``, newest first."""
        stmt = list_statement(where, limit, after, extra_columns=self.extra_columns)
        return [self._view(r) for r in await self._execute(stmt)]

    async def recording(self, recording_id: int) -> RecordingView | None:
        rows = await self._execute(one_statement(recording_id, extra_columns=self.extra_columns))
        return self._view(rows[0]) if rows else None

    async def talk_groups(self, limit: int = MAX_TALK_GROUPS) -> list[tuple[int, datetime]]:
        """The talk groups with at least one recording, in order, and their newest burst."""
        rows = await self._execute(TALK_GROUPS, {"limit": limit})
        return [(int(g), newest) for g, newest in rows]


__all__ = [
    "BASE_COLUMNS",
    "Position",
    "Reads",
    "RecordingFilter",
    "RecordingView",
    "list_statement",
    "one_statement",
]
