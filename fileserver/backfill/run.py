"""The backfill run: reads the plan's ranges a batch at a time and gives every record an
outcome (batched look-ups first, then the worker's processor with bounded concurrency;
``--verify`` re-checks what is already stored)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from fileserver.backfill.options import BackfillOptions
from fileserver.backfill.ranges import Plan
from fileserver.backfill.report import FROM_OUTCOME, Held, Kind, Tally
from fileserver.errors import BreakerOpen, PermanentError
from fileserver.events import SkippedEvent, TalkEvent, parse_event
from fileserver.layout import is_md5, object_key, object_metadata, stored_matches
from fileserver.pipeline import Outcome, Result
from fileserver.probe import check_duration
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repair import Restored, Wanted, restore_object
from fileserver.repository import StoredRow
from fileserver.retry import DependencyRetry
from fileserver.runtime import Runtime
from fileserver.sources import SourcePolicy
from fileserver.storage import StoredObject

log = logging.getLogger("fileserver.backfill")


@dataclass(frozen=True)
class RepairResult(Result):
    """A pipeline result that may say the row was repaired for an object already stored."""

    repaired_row: bool = False


class Backfill:
    """Reads the plan's ranges and gives every record an outcome, a batch at a time."""

    def __init__(
        self,
        runtime: Runtime,
        plan: Plan,
        options: BackfillOptions,
        tally: Tally,
        *,
        concurrency: int,
    ) -> None:
        self.runtime = runtime
        self.plan = plan
        self.options = options
        self.tally = tally
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[int, set[int]] = {r.partition: set() for r in plan.ranges}
        self._next: dict[int, int] = {r.partition: r.start for r in plan.ranges}
        #: Set by the first event the dead-letter breaker would hold: the run stops there.
        self.halted: BreakerOpen | None = None
        self.held: list[Held] = []
        self._reader: asyncio.Task[None] | None = None
        settings = runtime.settings
        self._policy = SourcePolicy(settings.allowed_sources)
        # hold=False like the runtime's processor (open_runtime(settings, hold=False)):
        # waiting behind the breaker would keep a run that must terminate from ending.
        self._verifier = Processor(
            self._ingest_checking_store,
            runtime.repo,
            runtime.dead_letters,
            source_retry_s=settings.source_retry_s,
            internal_error_attempts=settings.internal_error_attempts,
            health=runtime.health,
            breaker=runtime.processor.breaker,
            hold=False,
        )

    @property
    def _dependencies(self) -> DependencyRetry:
        """The processor's retry loop for outages (its health, backoff and metrics)."""
        return self.runtime.processor.dependencies

    # -- reading

    async def run(self, consumer: AIOKafkaConsumer) -> None:
        """Replay every range; returns once every record has its outcome.

        When the dead-letter breaker opens (:attr:`halted`), the reader is cancelled so no
        new event starts, the events in flight finish, and it returns early; what is not
        finished (held events included) stays in :meth:`resume_offsets`.
        """
        reader = asyncio.create_task(self._read(consumer), name="backfill reader")
        self._reader = reader
        try:
            try:
                await reader
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self.halted is None or (current is not None and current.cancelling()):
                    raise  # interrupted (or cancelled from outside): abandon the rest
            if self._tasks:
                await asyncio.gather(*list(self._tasks))
        finally:
            reader.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(reader, *list(self._tasks), return_exceptions=True)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        """Read the ranges a batch at a time and dispatch their events until the end."""
        topic = self.plan.topic
        active = {TopicPartition(topic, r.partition): r for r in self.plan.ranges if r.size}
        for r in self.plan.ranges:
            if not r.size:
                self._next[r.partition] = r.stop
        if active:
            consumer.assign(list(active))
            for tp, r in active.items():
                consumer.seek(tp, r.start)
        while active:
            batch = await consumer.getmany(
                *active, timeout_ms=500, max_records=self.options.batch_size
            )
            records: list[SourceRecord] = []
            for tp, messages in batch.items():
                wanted = active.get(tp)
                if wanted is None:
                    continue
                for m in messages:
                    if m.offset >= wanted.stop:
                        break
                    if m.offset >= wanted.start:
                        records.append(
                            SourceRecord(
                                topic=m.topic,
                                partition=m.partition,
                                offset=m.offset,
                                value=m.value,
                                key=m.key,
                                timestamp_ms=m.timestamp,
                            )
                        )
            if records:
                await self._handle(records)
            for tp in list(active):
                if await consumer.position(tp) >= active[tp].stop:
                    consumer.pause(tp)
                    self._next[tp.partition] = active.pop(tp).stop

    def resume_offsets(self) -> dict[int, int]:
        """Per unfinished partition, the first offset a later run must start from."""
        out: dict[int, int] = {}
        for r in self.plan.ranges:
            pending = self._in_flight[r.partition]
            first = min(pending) if pending else self._next[r.partition]
            if first < r.stop:
                out[r.partition] = first
        return out

    async def _handle(self, records: list[SourceRecord]) -> None:
        """Classify one batch with two batched look-ups; dispatch what needs work."""
        talk: dict[int, TalkEvent] = {}
        invalid: set[int] = set()
        kinds: dict[int, Kind] = {}
        for i, record in enumerate(records):
            try:
                parsed = parse_event(record.value)
            except PermanentError:
                invalid.add(i)
                continue
            if isinstance(parsed, SkippedEvent):
                kinds[i] = Kind.SKIPPED
            else:
                talk[i] = parsed
        urls = [event.file_path for event in talk.values()]
        present: set[str] = set()
        if urls:
            present = await self._dependencies.call(
                lambda: self.runtime.repo.existing_source_urls(urls), what="recordings look-up"
            )
        rest = [i for i, e in talk.items() if e.file_path not in present] + sorted(invalid)
        failed: set[tuple[int, int]] = set()
        if rest:
            positions = [(records[i].partition, records[i].offset) for i in rest]
            failed = await self._dependencies.call(
                lambda: self.runtime.repo.failed_positions(self.plan.topic, positions),
                what="ingest_failures look-up",
            )
        for i, record in enumerate(records):
            event = talk.get(i)
            kind = kinds.get(i)
            work: Awaitable[Kind] | None = None
            if kind is None:
                if event is not None and event.file_path in present:
                    if self.options.verify:
                        work = self._verify_present(record, event)
                    else:
                        kind = Kind.ALREADY_PRESENT
                elif (record.partition, record.offset) in failed:
                    kind = Kind.ALREADY_FAILED
                elif self.options.dry_run:
                    kind = self._would(event)
                else:
                    work = self._ingest(record)
            if work is not None:
                await self._dispatch(record, work)
            elif kind is not None:
                self.tally.add(kind)
                self._next[record.partition] = record.offset + 1

    def _would(self, event: TalkEvent | None) -> Kind:
        """--dry-run: a new talk event, or one the worker would dead-letter at once."""
        if event is None:
            return Kind.WOULD_DEAD_LETTER
        try:
            self._policy.check(event.file_path)
        except PermanentError:
            return Kind.WOULD_DEAD_LETTER
        return Kind.NEW

    async def _dispatch(self, record: SourceRecord, work: Awaitable[Kind]) -> None:
        """Start ``work`` once a slot is free (and the dependencies answer)."""
        coro = work
        try:
            await self.runtime.health.wait_ok()
            await self._slots.acquire()
        except BaseException:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise
        self._in_flight[record.partition].add(record.offset)
        self._next[record.partition] = record.offset + 1
        self.tally.in_flight += 1
        task = asyncio.create_task(self._run(record, coro), name=f"backfill {record.source}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: SourceRecord, work: Awaitable[Kind]) -> None:
        try:
            kind = await work
        except asyncio.CancelledError:
            raise
        except BreakerOpen as exc:  # not a bug: the run stops; the event stays unfinished
            self._halt(record, exc)
            return
        except Exception as exc:  # a bug: report it, keep the rest of the run going
            log.exception("unexpected error on %s", record.source)
            self.tally.problems.append(f"{record.source}: {type(exc).__name__}: {exc}")
            kind = Kind.ERROR
        finally:
            self._slots.release()
            self.tally.in_flight -= 1
        self._in_flight[record.partition].discard(record.offset)
        self.tally.add(kind)

    def _halt(self, record: SourceRecord, exc: BreakerOpen) -> None:
        """The breaker would hold ``record``: stop reading (no new event starts).

        The offset stays in ``_in_flight`` and is not counted, so :meth:`resume_offsets`
        starts at it: it was neither ingested nor dead-lettered.
        """
        self.held.append(Held(record.topic, record.partition, record.offset, exc.reason))
        if self.halted is not None:
            return
        self.halted = exc
        log.error(
            "stopping the backfill at %s (%s): %s; no new events are started",
            record.source,
            exc.reason,
            exc.detail,
        )
        if self._reader is not None:
            self._reader.cancel()

    # -- events without a row: the worker's path

    async def _ingest(self, record: SourceRecord) -> Kind:
        processor: Processor = self._verifier if self.options.verify else self.runtime.processor
        result = await processor.process(record)
        if isinstance(result, RepairResult) and result.repaired_row:
            line = f"row for stored object {result.s3_key} ({record.source})"
            log.warning("repaired %s", line)
            self.tally.repairs.append(line)
            return Kind.REPAIRED_ROW
        if result.outcome is Outcome.DEAD_LETTERED:
            self.tally.dead_lettered_by_reason[result.reason or "unknown"] += 1
        return FROM_OUTCOME[result.outcome]

    async def _ingest_checking_store(self, record: SourceRecord) -> Result:
        """The pipeline's steps, skipping the upload when the object is already stored."""
        parsed = parse_event(record.value)
        if isinstance(parsed, SkippedEvent):
            return Result(Outcome.SKIPPED, record, skipped_type=parsed.msg_type)
        event = parsed
        ingestor = self.runtime.ingestor
        done = await ingestor.already_done(record, event)
        if done is not None:
            return Result(done, record, event=event)
        async with self.runtime.fetcher.download(event.file_path) as download:
            ingestor.verify_md5(event, download)
            audio = await ingestor.probe(download)
            check_duration(audio, ingestor.max_duration_s)
            key = object_key(event, download.md5)
            stored = await self.runtime.store.head(key)
            had_object = stored_matches(stored, size=download.size, md5=download.md5)
            if not had_object:
                await ingestor.upload(event, download)
            inserted = await ingestor.record(record, event, download, audio, key)
        return RepairResult(
            Outcome.INGESTED if inserted else Outcome.DUPLICATE,
            record,
            event=event,
            md5=download.md5,
            s3_key=key,
            audio=audio,
            repaired_row=inserted and had_object,
        )

    # -- events with a row: --verify

    async def _verify_present(self, record: SourceRecord, event: TalkEvent) -> Kind:
        """Re-download, compare with the row and the stored object, repair the object.

        Under the processor's retry policy (its source budget; outages waited out); a bug
        is not retried here but reported as an error of this record."""
        checked = await self.runtime.processor.retrying(
            record, lambda: self._check_present(record, event), retry_bugs=False
        )
        if isinstance(checked, PermanentError):
            return await self._check_object_only(record, event, str(checked))
        return checked

    async def _check_present(self, record: SourceRecord, event: TalkEvent) -> Kind:
        row = await self.runtime.repo.recording_row(event.file_path)
        if row is None:  # deleted since the batch look-up: ingest it like a new event
            return await self._ingest(record)
        store = self.runtime.store
        # Where the layout puts this event's object (a row whose md5 is no md5 cannot
        # match the source's: restore_object reports that first).
        key = object_key(event, row.md5) if is_md5(row.md5) else None
        wanted = Wanted(
            source_url=event.file_path,
            bucket=row.s3_bucket,
            key=row.s3_key,
            md5=row.md5,
            size=row.size_bytes,
            metadata=object_metadata(
                uid=event.uid, grp_id=event.grp_id, md5=row.md5, timestamp=event.timestamp
            ),
        )
        done = await restore_object(
            wanted, self.runtime.fetcher, store, expected_key=key, reuse_matching=True
        )
        if done.outcome is Restored.SOURCE_CHANGED:
            return self._problem(
                record,
                f"the source now has md5 {done.source_md5} ({done.source_size} bytes) but the "
                f"row says {row.md5} ({row.size_bytes} bytes); left unchanged",
            )
        if done.outcome is Restored.ELSEWHERE:
            return self._problem(
                record,
                f"the row points at {row.s3_bucket}/{row.s3_key}, expected "
                f"{store.bucket}/{key}; left unchanged",
            )
        if done.outcome is Restored.ALREADY_STORED:
            return Kind.ALREADY_PRESENT
        stored = done.previous
        why = "missing" if stored is None else f"different ({stored.size} bytes)"
        line = f"object {key} was {why} ({record.source})"
        log.warning("repaired %s", line)
        self.tally.repairs.append(line)
        return Kind.REPAIRED_OBJECT

    async def _check_object_only(self, record: SourceRecord, event: TalkEvent, why: str) -> Kind:
        """The source cannot be re-downloaded: at least check the stored object."""

        async def look_up() -> tuple[StoredRow | None, StoredObject | None]:
            row = await self.runtime.repo.recording_row(event.file_path)
            return row, (await self.runtime.store.head(row.s3_key) if row else None)

        row, stored = await self._dependencies.call(look_up, what=f"verify {record.source}")
        if row is not None and stored_matches(stored, size=row.size_bytes, md5=row.md5):
            log.warning(
                "could not re-download %s (%s); its stored object matches the row",
                record.source,
                why,
            )
            return Kind.ALREADY_PRESENT
        return self._problem(record, f"object missing or different and the source failed: {why}")

    def _problem(self, record: SourceRecord, detail: str) -> Kind:
        line = f"{record.source}: {detail}"
        log.warning("verify: %s", line)
        self.tally.problems.append(line)
        return Kind.PROBLEM
