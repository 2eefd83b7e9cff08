"""``fileserver reconcile``: compare the bucket with the ``recordings`` table.

Both sides are read in key order and merged, so memory stays flat whatever their size:
the bucket page by page (``ObjectStore.list_objects``), the table in short keyset
batches ordered by ``s3_key`` in byte order, the order S3 lists keys in
(``Repository.recordings_by_key``). It reports

* ``missing_object``: a row whose object is not in the bucket,
* ``size_mismatch`` / ``md5_mismatch``: a row whose object's size or md5 differs, as
  :func:`fileserver.layout.judge` rules (the md5 is the ETag when that is the object's
  md5, else the ``md5`` metadata the worker wrote, read with one HEAD; an object with
  neither has an unknown md5, which is never a match),
* ``orphan_object``: an object no row points to. Objects younger than ``min_age_s``
  are not judged (the worker uploads before it inserts the row), nor are objects under
  the quarantine prefix.

Each candidate is re-checked once (HEAD, or a row look-up) before it is reported, so
an event ingested during the scan is not a false alarm.

Read-only by default. With ``repair=True`` a row's object is re-downloaded from the
row's ``source_url`` through the worker's own fetcher (source allowlist, size cap) and
stored again under the row's key only if its md5 and size equal the row's
(:func:`fileserver.repair.restore_object`, as ``backfill --verify`` does); a source
that is gone or now serves other bytes is reported as unrepairable. Orphans are moved
(copy, verify, delete) under the quarantine prefix.

Storage and database go through the adapters every command uses (:class:`ObjectStore`,
:class:`Repository`), checked first by the worker's preflight checks
(:mod:`fileserver.preflight`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO, TypeVar

from fileserver.errors import ConfigError, DependencyUnavailable, PermanentError, RetryableError
from fileserver.layout import Verdict, declared_md5, judge
from fileserver.pipeline import Downloads
from fileserver.preflight import check_stores
from fileserver.repair import Restored, Store, Wanted, restore_object
from fileserver.repository import RecordingRef, Repository
from fileserver.settings import Settings
from fileserver.storage import ListedObject, ObjectStore
from fileserver.summary import Output, add_json_option

T = TypeVar("T")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_QUARANTINE_PREFIX = "quarantine/"
DEFAULT_MIN_AGE_S = 3600.0
#: Objects per listing page, and rows per statement.
BATCH = 1000


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


async def _next(it: AsyncIterator[T]) -> T | None:
    return await anext(it, None)


async def _in_key_order(objects: AsyncIterator[ListedObject]) -> AsyncIterator[ListedObject]:
    """The listing, checked to be in byte order: the merge depends on it."""
    previous: str | None = None
    async for obj in objects:
        if previous is not None and obj.key.encode() <= previous.encode():
            raise RuntimeError(f"the bucket listed {obj.key!r} after {previous!r}")
        previous = obj.key
        yield obj


class Reconciler:
    """Merges the two sorted sides and classifies every key."""

    def __init__(
        self,
        store: ObjectStore,
        repo: Repository,
        *,
        min_age_s: float = DEFAULT_MIN_AGE_S,
        quarantine_prefix: str = DEFAULT_QUARANTINE_PREFIX,
        progress: Progress | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch: int = BATCH,
    ) -> None:
        if not quarantine_prefix or quarantine_prefix.startswith("/"):
            raise ConfigError(f"--quarantine-prefix {quarantine_prefix!r} must be a key prefix")
        self.store = store
        self.repo = repo
        self.min_age_s = min_age_s
        self.quarantine_prefix = quarantine_prefix
        self.progress = progress or Progress(enabled=False)
        self._now = now
        self._batch = batch
        # Rows of the issues found, for repair.
        self.rows_by_issue: dict[int, RecordingRef] = {}

    async def scan(self, report: Report) -> None:
        """Fill ``report`` with every inconsistency between the bucket and the table."""
        objects = _in_key_order(self.store.list_objects(page_size=self._batch))
        rows = self.repo.recordings_by_key(self.store.bucket, batch_rows=self._batch)
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

    def _add(self, report: Report, issue: Issue, row: RecordingRef | None = None) -> None:
        report.issues.append(issue)
        if row is not None:
            self.rows_by_issue[id(issue)] = row

    async def _row_without_listing(self, report: Report, row: RecordingRef) -> None:
        # Re-check: the object may have been uploaded after the listing passed its key.
        head = await self.store.head(row.s3_key)
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
        await self._compare(report, row, head.size, head.etag, metadata=head.metadata)

    async def _compare(
        self,
        report: Report,
        row: RecordingRef,
        size: int,
        etag: str,
        *,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Judge one object against its row (:func:`fileserver.layout.judge`); the
        metadata is read (HEAD) only when the listing's ETag is no evidence."""
        verdict = judge(
            size=row.size_bytes, md5=row.md5, stored_size=size, etag=etag, metadata=metadata
        )
        if verdict is Verdict.MD5_UNKNOWN and metadata is None:
            # multipart or SSE-KMS ETags are not md5s: ask for the metadata
            head = await self.store.head(row.s3_key)
            metadata = head.metadata if head is not None else {}
            verdict = judge(
                size=row.size_bytes, md5=row.md5, stored_size=size, etag=etag, metadata=metadata
            )
        if verdict is Verdict.MATCH:
            report.consistent += 1
            return
        issue = Issue(
            Kind.SIZE_MISMATCH,
            row.s3_key,
            row_id=row.id,
            source_url=row.source_url,
            expected_size=row.size_bytes,
            actual_size=size,
            expected_md5=row.md5,
        )
        if verdict is not Verdict.SIZE_DIFFERS:
            issue.kind = Kind.MD5_MISMATCH
            declared = declared_md5(metadata or {})
            issue.actual_md5 = declared or (etag if _MD5.match(etag) else None)
        self._add(report, issue, row)

    async def _object_without_row(self, report: Report, obj: ListedObject, cutoff: float) -> None:
        if obj.key.startswith(self.quarantine_prefix):
            report.quarantined_objects += 1
            return
        report.objects += 1
        if obj.last_modified.timestamp() > cutoff:
            report.recent_objects_skipped += 1
            return
        # Re-check: the row may have been inserted after the row scan passed its key.
        if await self.repo.count_recordings_at(self.store.bucket, obj.key):
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

    async def repair(self, report: Report, fetcher: Downloads, uploads: Store) -> None:
        """Fix what can be fixed; record the outcome on each issue. Rows' objects are
        downloaded through ``fetcher`` and stored through ``uploads`` (the worker's);
        orphans are moved within the bucket."""
        for issue in report.issues:
            if issue.kind is Kind.ORPHAN_OBJECT:
                await self._quarantine(issue)
            else:
                await self._restore(issue, self.rows_by_issue[id(issue)], fetcher, uploads)
            self.progress.update(report)

    async def _quarantine(self, issue: Issue) -> None:
        if await self.repo.count_recordings_at(self.store.bucket, issue.key):
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = "a row points to it now: left in place"
            return
        target = self.quarantine_prefix + issue.key
        await self.store.move(issue.key, target)
        issue.repair, issue.repair_detail = Repair.QUARANTINED, f"moved to {target}"

    async def _restore(
        self, issue: Issue, row: RecordingRef, fetcher: Downloads, uploads: Store
    ) -> None:
        """Download the row's source again and store it under the row's key."""
        try:
            done = await restore_object(Wanted.of_row(row), fetcher, uploads)
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
        if done.outcome is Restored.SOURCE_CHANGED:
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = (
                f"the source now serves other bytes (md5 {done.source_md5}, "
                f"{done.source_size} bytes)"
            )
        elif done.outcome is Restored.ELSEWHERE:  # the rows scanned are the bucket's
            issue.repair = Repair.UNREPAIRABLE
            issue.repair_detail = f"the row's bucket {row.s3_bucket} is not {uploads.bucket}"
        else:
            issue.repair = Repair.REPAIRED
            issue.repair_detail = f"downloaded again from the source ({row.size_bytes} bytes)"


async def reconcile(
    settings: Settings,
    *,
    repair: bool = False,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    quarantine_prefix: str = DEFAULT_QUARANTINE_PREFIX,
    progress: Progress | None = None,
    batch: int = BATCH,
) -> Report:
    """Compare (and with ``repair``, fix) ``settings.s3_bucket`` and ``recordings``;
    ``batch`` objects per listing page and rows per statement."""
    from fileserver.runtime import make_engine, make_s3_client, open_runtime

    report = Report(bucket=settings.s3_bucket, repair=repair)
    async with AsyncExitStack() as stack:
        engine = make_engine(settings)
        stack.push_async_callback(engine.dispose)
        repo = Repository(engine)
        stack.push_async_callback(repo.close)
        executor = ThreadPoolExecutor(max_workers=settings.s3_threads, thread_name_prefix="s3")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        store = ObjectStore(make_s3_client(settings), settings.s3_bucket, executor)
        await check_stores(settings, repo, store)
        reconciler = Reconciler(
            store,
            repo,
            min_age_s=min_age_s,
            quarantine_prefix=quarantine_prefix,
            progress=progress,
            batch=batch,
        )
        try:
            await reconciler.scan(report)
            if repair and report.issues:
                runtime = await stack.enter_async_context(open_runtime(settings))
                await reconciler.repair(report, runtime.fetcher, runtime.store)
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
    """The ``fileserver reconcile`` command: the text report, and the JSON summary with
    ``--json`` (:mod:`fileserver.summary`)."""
    output = Output(json_path, out=out)
    report = asyncio.run(
        reconcile(
            settings,
            repair=repair,
            min_age_s=min_age_s,
            quarantine_prefix=quarantine_prefix,
            progress=Progress(enabled=progress),
        )
    )
    print(report.render(), file=output.text)
    return output.emit("reconcile", report.as_json(), report.exit_code)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """``fileserver reconcile``'s entry point (see :func:`add_parser`)."""
    return run(
        settings,
        repair=args.repair,
        json_path=args.json,
        min_age_s=args.min_age,
        quarantine_prefix=args.quarantine_prefix,
        progress=False if args.no_progress else None,
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver reconcile``."""
    rc = sub.add_parser(
        "reconcile",
        help="compare the bucket with the recordings table (read-only unless --repair)",
        description="Find rows whose object is missing or whose object's size or md5 differs, "
        "and objects no row points to, in FILESERVER_S3_BUCKET and the recordings table of "
        "FILESERVER_DATABASE_URL. Read-only unless --repair: then a row's object is "
        "downloaded again from its source_url (kept only if its md5 and size equal the row's) "
        "and orphan objects are moved under --quarantine-prefix. Exit status: 0 they agree "
        "(after repair), 1 inconsistencies remain, 2 configuration error, 3 the database or "
        "the bucket unreachable (at the start or during the run), 130 interrupted.",
    )
    rc.add_argument("--repair", action="store_true", help="fix what can be fixed")
    add_json_option(rc, "the report")
    rc.add_argument(
        "--min-age",
        type=float,
        default=DEFAULT_MIN_AGE_S,
        metavar="SECONDS",
        help="objects younger than this are not judged orphans (default 3600: the worker "
        "uploads before it inserts the row)",
    )
    rc.add_argument(
        "--quarantine-prefix",
        default=DEFAULT_QUARANTINE_PREFIX,
        metavar="PREFIX",
        help="where --repair moves orphan objects (default quarantine/); never scanned",
    )
    rc.add_argument(
        "--no-progress", action="store_true", help="no progress line even on a terminal"
    )
    rc.set_defaults(func=run_command)
