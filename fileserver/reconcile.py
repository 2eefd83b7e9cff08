"""``fileserver reconcile``: compare the bucket with the ``recordings`` table.

Both sides are read in key order and merged, so memory stays flat whatever their size:
the bucket with a ``list_objects_v2`` paginator, the table with a server-side cursor
ordered by ``s3_key`` in byte order (``COLLATE "C"``, the order S3 lists keys in). It
reports

* ``missing_object``: a row whose object is not in the bucket,
* ``size_mismatch`` / ``md5_mismatch``: a row whose object's size or md5 differs (the
  md5 is the ETag when that is the object's md5, else the ``md5`` metadata the worker
  wrote, read with one HEAD),
* ``orphan_object``: an object no row points to. Objects younger than ``min_age_s``
  are not judged (the worker uploads before it inserts the row), nor are objects under
  the quarantine prefix.

Each candidate is re-checked once (HEAD, or a row look-up) before it is reported, so
an event ingested during the scan is not a false alarm.

Read-only by default. With ``repair=True`` a row's object is re-downloaded from the
row's ``source_url`` through the worker's own fetcher (source allowlist, size cap) and
stored again under the row's key only if its md5 and size equal the row's; a source
that is gone or now serves other bytes is reported as unrepairable. Orphans are moved
(copy, verify, delete) under the quarantine prefix.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from fileserver.errors import ConfigError, DependencyUnavailable, PermanentError, RetryableError
from fileserver.models import Recording
from fileserver.settings import Settings
from fileserver.storage import head_object, s3_errors

if TYPE_CHECKING:
    from fileserver.runtime import Runtime

T = TypeVar("T")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_QUARANTINE_PREFIX = "quarantine/"
DEFAULT_MIN_AGE_S = 3600.0
ROW_BATCH = 1000


class Kind(StrEnum):
    """The inconsistencies reconcile finds."""

    MISSING_OBJECT = "missing_object"
    SIZE_MISMATCH = "size_mismatch"
    MD5_MISMATCH = "md5_mismatch"
    ORPHAN_OBJECT = "orphan_object"


class Repair(StrEnum):
    """What ``--repair`` did about one issue."""

    REPAIRED = "repaired"
    QUARANTINED = "quarantined"
    UNREPAIRABLE = "unrepairable"


@dataclass(frozen=True)
class RowRef:
    """The columns of a ``recordings`` row that reconcile needs."""

    id: int
    s3_key: str
    source_url: str
    md5: str
    size_bytes: int
    uid: int
    grp_id: int
    event_time: datetime


@dataclass(frozen=True)
class ObjectRef:
    """One listed object."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass
class Issue:
    """One inconsistency, and what repair did about it."""

    kind: Kind
    key: str
    row_id: int | None = None
    source_url: str | None = None
    expected_size: int | None = None
    actual_size: int | None = None
    expected_md5: str | None = None
    actual_md5: str | None = None
    repair: Repair | None = None
    repair_detail: str | None = None

    @property
    def resolved(self) -> bool:
        return self.repair in (Repair.REPAIRED, Repair.QUARANTINED)

    def describe(self) -> str:
        if self.kind is Kind.ORPHAN_OBJECT:
            what = f"{self.key} ({self.actual_size} bytes): no row points to it"
        elif self.kind is Kind.MISSING_OBJECT:
            what = f"row {self.row_id} {self.key}: object missing"
        elif self.kind is Kind.SIZE_MISMATCH:
            what = (
                f"row {self.row_id} {self.key}: object has {self.actual_size} bytes, "
                f"row says {self.expected_size}"
            )
        else:
            what = (
                f"row {self.row_id} {self.key}: object md5 {self.actual_md5 or 'unknown'}, "
                f"row says {self.expected_md5}"
            )
        if self.repair is not None:
            what += f"  -> {self.repair.value}"
            if self.repair_detail:
                what += f": {self.repair_detail}"
        return what


@dataclass
class Report:
    """What one reconcile run found (and repaired)."""

    bucket: str
    repair: bool
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    rows: int = 0
    objects: int = 0
    consistent: int = 0
    recent_objects_skipped: int = 0
    quarantined_objects: int = 0
    issues: list[Issue] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Issues by kind (every kind, zeros included)."""
        out = {kind.value: 0 for kind in Kind}
        for issue in self.issues:
            out[issue.kind.value] += 1
        return out

    @property
    def unresolved(self) -> list[Issue]:
        return [i for i in self.issues if not i.resolved]

    @property
    def exit_code(self) -> int:
        """0 when the bucket and the table agree (after repair), 1 otherwise."""
        return 1 if self.unresolved else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "table": "recordings",
            "mode": "repair" if self.repair else "read-only",
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "rows": self.rows,
            "objects": self.objects,
            "consistent": self.consistent,
            "recent_objects_skipped": self.recent_objects_skipped,
            "quarantined_objects": self.quarantined_objects,
            "counts": self.counts(),
            "unresolved": len(self.unresolved),
            "issues": [
                {k: (v.value if isinstance(v, StrEnum) else v) for k, v in asdict(i).items()}
                for i in self.issues
            ],
        }

    def render(self) -> str:
        mode = "repair" if self.repair else "read-only"
        lines = [
            f"reconcile: bucket {self.bucket} vs table recordings ({mode})",
            f"  rows checked            {self.rows:>8,}",
            f"  objects checked         {self.objects:>8,}",
            f"  consistent              {self.consistent:>8,}",
        ]
        for kind, n in self.counts().items():
            lines.append(f"  {kind:<24}{n:>8,}")
        lines.append(f"  recent objects skipped  {self.recent_objects_skipped:>8,}")
        lines.append(f"  already in quarantine   {self.quarantined_objects:>8,}")
        if self.issues:
            lines.append("issues:")
            lines.extend(f"  {i.kind.value:<15} {i.describe()}" for i in self.issues)
        if self.repair:
            repaired = sum(1 for i in self.issues if i.resolved)
            lines.append(f"repaired or quarantined {repaired}, unresolved {len(self.unresolved)}")
        elif self.issues:
            lines.append("read-only: nothing was changed (run with --repair to fix)")
        else:
            lines.append("the bucket and the table agree")
        return "\n".join(lines)


class Progress:
    """One self-overwriting status line on a terminal (silent otherwise)."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._shown = 0.0

    def update(self, report: Report, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._shown < 0.25):
            return
        self._shown = now
        self._stream.write(
            f"\rreconcile: {report.rows:,} rows, {report.objects:,} objects, "
            f"{len(report.issues):,} issues"
        )
        self._stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _db_error(exc: BaseException) -> DependencyUnavailable:
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
    return DependencyUnavailable("postgres", detail)


class Bucket:
    """The S3 calls reconcile makes, off the event loop, with errors translated."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self.name = bucket

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        return await self._thread(fn, Bucket=self.name, **kwargs)

    async def _thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with s3_errors(self.name):
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def check(self) -> None:
        await self._call(self._client.head_bucket)

    async def objects(self) -> AsyncIterator[ObjectRef]:
        """Every object in key order (checked: the merge depends on it)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, PaginationConfig={"PageSize": 1000}
        )
        iterator = iter(pages)
        previous: str | None = None
        while True:
            page: dict[str, Any] | None = await self._thread(next, iterator, None)
            if page is None:
                return
            for item in page.get("Contents", []):
                key = str(item["Key"])
                if previous is not None and key.encode() <= previous.encode():
                    raise RuntimeError(f"the bucket listed {key!r} after {previous!r}")
                previous = key
                yield ObjectRef(
                    key=key,
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"').lower(),
                    last_modified=item["LastModified"],
                )

    async def head(self, key: str) -> tuple[int, str | None] | None:
        """``(size, md5 metadata)`` of ``key``, or ``None`` when it does not exist."""
        stored = await self._thread(head_object, self._client, self.name, key)
        if stored is None:
            return None
        md5 = stored.metadata.get("md5")
        return stored.size, (str(md5).lower() if md5 else None)

    async def move(self, key: str, target: str) -> None:
        """Copy ``key`` to ``target``, check the copy, delete ``key``."""
        await self._call(
            self._client.copy_object,
            Key=target,
            CopySource={"Bucket": self.name, "Key": key},
            MetadataDirective="COPY",
        )
        if await self.head(target) is None:
            raise DependencyUnavailable("s3", f"the copy {target} is not there; kept {key}")
        await self._call(self._client.delete_object, Key=key)


class Table:
    """The ``recordings`` rows of one bucket, in key order."""

    def __init__(self, engine: AsyncEngine, bucket: str) -> None:
        self._engine = engine
        self._bucket = bucket

    async def check(self) -> None:
        try:
            async with self._engine.connect() as conn:
                await conn.execute(text("SELECT 1 FROM recordings LIMIT 0"))
        except ProgrammingError:
            raise ConfigError(
                "the database has no recordings table: run `fileserver migrate`"
            ) from None
        except (OperationalError, InterfaceError, OSError) as exc:
            raise _db_error(exc) from None

    async def rows(self) -> AsyncIterator[RowRef]:
        stmt = (
            select(
                Recording.id,
                Recording.s3_key,
                Recording.source_url,
                Recording.md5,
                Recording.size_bytes,
                Recording.uid,
                Recording.grp_id,
                Recording.event_time,
            )
            .where(Recording.s3_bucket == self._bucket)
            .order_by(Recording.s3_key.collate("C"), Recording.id)
            .execution_options(yield_per=ROW_BATCH)
        )
        try:
            async with self._engine.connect() as conn:
                result = await conn.stream(stmt)
                async for r in result:
                    yield RowRef(
                        id=int(r.id),
                        s3_key=str(r.s3_key),
                        source_url=str(r.source_url),
                        md5=str(r.md5).strip().lower(),
                        size_bytes=int(r.size_bytes),
                        uid=int(r.uid),
                        grp_id=int(r.grp_id),
                        event_time=r.event_time,
                    )
        except (OperationalError, InterfaceError, OSError) as exc:
            raise _db_error(exc) from None

    async def rows_for_key(self, key: str) -> int:
        try:
            async with self._engine.connect() as conn:
                result = await conn.execute(
                    select(Recording.id).where(
                        Recording.s3_bucket == self._bucket, Recording.s3_key == key
                    )
                )
                return len(result.all())
        except DBAPIError as exc:
            raise _db_error(exc) from None


async def _next(it: AsyncIterator[T]) -> T | None:
    return await anext(it, None)


class Reconciler:
    """Merges the two sorted sides and classifies every key."""

    def __init__(
        self,
        bucket: Bucket,
        table: Table,
        *,
        min_age_s: float = DEFAULT_MIN_AGE_S,
        quarantine_prefix: str = DEFAULT_QUARANTINE_PREFIX,
        progress: Progress | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not quarantine_prefix or quarantine_prefix.startswith("/"):
            raise ConfigError(f"--quarantine-prefix {quarantine_prefix!r} must be a key prefix")
        self.bucket = bucket
        self.table = table
        self.min_age_s = min_age_s
        self.quarantine_prefix = quarantine_prefix
        self.progress = progress or Progress(enabled=False)
        self._now = now
        # Rows of the issues found, for repair.
        self.rows_by_issue: dict[int, RowRef] = {}

    async def scan(self, report: Report) -> None:
        """Fill ``report`` with every inconsistency between the bucket and the table."""
        objects = self.bucket.objects()
        rows = self.table.rows()
        obj = await _next(objects)
        row = await _next(rows)
        cutoff = self._now().timestamp() - self.min_age_s
        while obj is not None or row is not None:
            if row is not None and (obj is None or row.s3_key.encode() < obj.key.encode()):
                report.rows += 1
                await self._row_without_listing(report, row)
                row = await _next(rows)
            elif obj is not None and (row is None or obj.key.encode() < row.s3_key.encode()):
                await self._object_without_row(report, obj, cutoff)
                obj = await _next(objects)
            else:
                assert obj is not None and row is not None
                report.objects += 1
                same_key = obj.key
                while row is not None and row.s3_key == same_key:
                    report.rows += 1
                    await self._compare(report, row, obj.size, obj.etag)
                    row = await _next(rows)
                obj = await _next(objects)
            self.progress.update(report)
        self.progress.update(report, force=True)

    def _add(self, report: Report, issue: Issue, row: RowRef | None = None) -> None:
        report.issues.append(issue)
        if row is not None:
            self.rows_by_issue[id(issue)] = row

    async def _row_without_listing(self, report: Report, row: RowRef) -> None:
        # Re-check: the object may have been uploaded after the listing passed its key.
        head = await self.bucket.head(row.s3_key)
        if head is None:
            self._add(
                report,
                Issue(
                    Kind.MISSING_OBJECT,
                    row.s3_key,
                    row_id=row.id,
                    source_url=row.source_url,
                    expected_size=row.size_bytes,
                    expected_md5=row.md5,
                ),
                row,
            )
            return
        report.objects += 1
        size, md5 = head
        await self._compare(report, row, size, etag="", metadata_md5=md5, headed=True)

    async def _compare(
        self,
        report: Report,
        row: RowRef,
        size: int,
        etag: str,
        *,
        metadata_md5: str | None = None,
        headed: bool = False,
    ) -> None:
        issue = Issue(
            Kind.SIZE_MISMATCH,
            row.s3_key,
            row_id=row.id,
            source_url=row.source_url,
            expected_size=row.size_bytes,
            actual_size=size,
            expected_md5=row.md5,
        )
        if size != row.size_bytes:
            self._add(report, issue, row)
            return
        if etag == row.md5:
            report.consistent += 1
            return
        if not headed:  # multipart or SSE-KMS ETags are not md5s: ask for the metadata
            head = await self.bucket.head(row.s3_key)
            metadata_md5 = head[1] if head is not None else None
        if metadata_md5 == row.md5:
            report.consistent += 1
            return
        issue.kind = Kind.MD5_MISMATCH
        issue.actual_md5 = metadata_md5 or (etag if _MD5.match(etag) else None)
        self._add(report, issue, row)

    async def _object_without_row(self, report: Report, obj: ObjectRef, cutoff: float) -> None:
        if obj.key.startswith(self.quarantine_prefix):
            report.quarantined_objects += 1
            return
        report.objects += 1
        if obj.last_modified.timestamp() > cutoff:
            report.recent_objects_skipped += 1
            return
        # Re-check: the row may have been inserted after the row cursor passed its key.
        if await self.table.rows_for_key(obj.key):
            report.consistent += 1
            return
        self._add(
            report,
            Issue(
                Kind.ORPHAN_OBJECT,
                obj.key,
                actual_size=obj.size,
                actual_md5=obj.etag if _MD5.match(obj.etag) else None,
            ),
        )

    # -- repair ------------------------------------------------------------------------

    async def repair(self, report: Report, runtime: Runtime) -> None:
        """Fix what can be fixed; record the outcome on each issue."""
        for issue in report.issues:
            if issue.kind is Kind.ORPHAN_OBJECT:
                await self._quarantine(issue)
            else:
                await self._restore(issue, self.rows_by_issue[id(issue)], runtime)
            self.progress.update(report)

    async def _quarantine(self, issue: Issue) -> None:
        if await self.table.rows_for_key(issue.key):
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = "a row points to it now: left in place"
            return
        target = self.quarantine_prefix + issue.key
        await self.bucket.move(issue.key, target)
        issue.repair, issue.repair_detail = Repair.QUARANTINED, f"moved to {target}"

    async def _restore(self, issue: Issue, row: RowRef, runtime: Runtime) -> None:
        """Download the row's source again and store it under the row's key."""
        try:
            async with runtime.fetcher.download(row.source_url) as download:
                if download.md5 != row.md5 or download.size != row.size_bytes:
                    issue.repair = Repair.UNREPAIRABLE
                    issue.repair_detail = (
                        f"the source now serves other bytes (md5 {download.md5}, "
                        f"{download.size} bytes)"
                    )
                    return
                metadata = {
                    "uid": str(row.uid),
                    "grp-id": str(row.grp_id),
                    "md5": row.md5,
                    "event-time": str(int(row.event_time.timestamp())),
                }
                await runtime.store.put_file(row.s3_key, download.content, row.md5, metadata)
        except PermanentError as exc:
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = f"source gone: {exc.reason.value}: {exc.detail}"
            return
        except DependencyUnavailable:
            raise
        except RetryableError as exc:
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = f"source unavailable, try again later: {exc.detail}"
            return
        issue.repair = Repair.REPAIRED
        issue.repair_detail = f"downloaded again from the source ({row.size_bytes} bytes)"


async def reconcile(
    settings: Settings,
    *,
    repair: bool = False,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    quarantine_prefix: str = DEFAULT_QUARANTINE_PREFIX,
    progress: Progress | None = None,
) -> Report:
    """Compare (and with ``repair``, fix) ``settings.s3_bucket`` and ``recordings``."""
    from fileserver.runtime import make_engine, make_s3_client, open_runtime

    report = Report(bucket=settings.s3_bucket, repair=repair)
    async with AsyncExitStack() as stack:
        engine = make_engine(settings)
        stack.push_async_callback(engine.dispose)
        bucket = Bucket(make_s3_client(settings), settings.s3_bucket)
        table = Table(engine, settings.s3_bucket)
        await table.check()
        try:
            await bucket.check()
        except DependencyUnavailable as exc:
            raise ConfigError(
                f"cannot use bucket FILESERVER_S3_BUCKET={settings.s3_bucket} at "
                f"FILESERVER_S3_ENDPOINT_URL={settings.s3_endpoint_url or '(AWS)'}: {exc.detail}"
            ) from None
        reconciler = Reconciler(
            bucket,
            table,
            min_age_s=min_age_s,
            quarantine_prefix=quarantine_prefix,
            progress=progress,
        )
        try:
            await reconciler.scan(report)
            if repair and report.issues:
                runtime = await stack.enter_async_context(open_runtime(settings))
                await reconciler.repair(report, runtime)
        finally:
            reconciler.progress.done()
    report.finished_at = datetime.now(UTC)
    return report


def run(
    settings: Settings,
    *,
    repair: bool,
    json_path: str | None,
    min_age_s: float,
    quarantine_prefix: str,
    progress: bool | None,
    out: TextIO | None = None,
) -> int:
    """The ``fileserver reconcile`` command: report (text, and JSON to a file or ``-``)."""
    out = out or sys.stdout
    report = asyncio.run(
        reconcile(
            settings,
            repair=repair,
            min_age_s=min_age_s,
            quarantine_prefix=quarantine_prefix,
            progress=Progress(enabled=progress),
        )
    )
    doc = json.dumps(report.as_json(), indent=2) + "\n"
    if json_path == "-":
        out.write(doc)
        print(report.render(), file=sys.stderr)
    else:
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(doc)
        print(report.render(), file=out)
    return report.exit_code
