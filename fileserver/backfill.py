"""``fileserver backfill``: replay a bounded range of the events topic through the pipeline.

It reads with a group-less consumer (``assign`` + ``seek``), so it never joins, commits
to or otherwise changes the live worker's consumer group. The range is resolved once at
start (``--from-offset``/``--from-time``, ``--to-offset``/``--to-time``, by default up to
the end offsets captured then), so the command always terminates. It never waits behind
the dead-letter breaker either: where the worker would hold events, the run stops
(exit status 4) with a resume command that starts at the first event it did not finish.

Each batch read from Kafka costs one batched ``recordings`` look-up (and one batched
``ingest_failures`` look-up for what is left): events already ingested, events that
already failed and msg_type 2/3 records are counted without any download. The others go
through the worker's :class:`~fileserver.processor.Processor` (same retries, same dead
letters) with bounded concurrency. ``--verify`` re-downloads already-ingested events,
compares them with their row and their stored object, and repairs what is missing.

The range parsing and planning at the top of this module is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TextIO, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from fileserver.errors import (
    BreakerOpen,
    ConfigError,
    DependencyUnavailable,
    PermanentError,
    SourceUnavailable,
)
from fileserver.events import SkippedEvent, TalkEvent, object_key, parse_event
from fileserver.pipeline import Outcome, Result
from fileserver.probe import check_duration
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.retry import RetryPolicy
from fileserver.runtime import Runtime, make_reader, open_runtime, preflight
from fileserver.settings import Settings
from fileserver.sources import SourcePolicy
from fileserver.storage import StoredObject

log = logging.getLogger("fileserver.backfill")
T = TypeVar("T")

LOOKUP_BATCH = 1000
EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_INTERRUPTED = 130
EXIT_BREAKER = 4  # stopped by the dead-letter breaker (FILESERVER_DLQ_MAX_CONSECUTIVE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --------------------------------------------------------------------------- ranges (pure)


@dataclass(frozen=True)
class OffsetSpec:
    """Offsets given on the command line: one for every partition and/or per partition."""

    default: int | None = None
    per_partition: Mapping[int, int] = field(default_factory=dict)

    def get(self, partition: int) -> int | None:
        """The offset asked for ``partition`` (its own, else the all-partitions one)."""
        return self.per_partition.get(partition, self.default)

    @property
    def only_pairs(self) -> bool:
        """Only ``P:N`` pairs were given (no offset for every partition)."""
        return self.default is None and bool(self.per_partition)


def _non_negative(text: str, what: str, option: str, value: str) -> int:
    text = text.strip().replace("_", "")
    if not text.isdigit():
        raise ConfigError(
            f"{option} {value!r}: {what} must be a non-negative integer "
            "(expected N for every partition or PARTITION:N)"
        )
    return int(text)


def parse_offsets(values: Sequence[str], option: str) -> OffsetSpec | None:
    """Parse repeated ``--from-offset``/``--to-offset`` values (``N``, ``P:N``, or commas)."""
    default: int | None = None
    pairs: dict[int, int] = {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise ConfigError(f"{option} {value!r}: empty item")
            if ":" in item:
                part_text, _, offset_text = item.partition(":")
                partition = _non_negative(part_text, "the partition", option, value)
                offset = _non_negative(offset_text, "the offset", option, value)
                if partition in pairs and pairs[partition] != offset:
                    raise ConfigError(
                        f"{option}: partition {partition} given twice "
                        f"({pairs[partition]} and {offset})"
                    )
                pairs[partition] = offset
            else:
                offset = _non_negative(item, "the offset", option, value)
                if default is not None and default != offset:
                    raise ConfigError(
                        f"{option}: two offsets for every partition ({default} and {offset}); "
                        "use PARTITION:N for per-partition offsets"
                    )
                default = offset
    if default is None and not pairs:
        return None
    return OffsetSpec(default, pairs)


def parse_time(value: str, option: str) -> datetime:
    """Parse an ISO-8601 date or date-time; one without a timezone is taken as UTC."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not an ISO-8601 time "
            "(e.g. 2024-05-01T08:30:00Z, 2024-05-01T10:30:00+02:00 or 2024-05-01)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def to_millis(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (Kafka's record timestamps)."""
    millis = (moment - _EPOCH) // timedelta(milliseconds=1)
    if millis < 0:
        raise ConfigError(f"{moment.isoformat()} is before 1970")
    return millis


def select_partitions(
    available: Iterable[int],
    requested: Sequence[int],
    from_offsets: OffsetSpec | None = None,
    to_offsets: OffsetSpec | None = None,
    *,
    topic: str = "the topic",
) -> list[int]:
    """The partitions to replay.

    ``--partition`` when given; else the partitions named by ``--from-offset P:N`` pairs
    when only pairs were given; else every partition of the topic.
    """
    existing = sorted(set(available))
    unknown = sorted(set(requested) - set(existing))
    if unknown:
        raise ConfigError(
            f"{topic} has partitions {_list_ints(existing)}; "
            f"--partition {_list_ints(unknown)} does not exist"
        )
    if requested:
        selected = sorted(set(requested))
    elif from_offsets is not None and from_offsets.only_pairs:
        selected = sorted(from_offsets.per_partition)
    else:
        selected = existing
    for option, spec in (("--from-offset", from_offsets), ("--to-offset", to_offsets)):
        if spec is None:
            continue
        outside = sorted(set(spec.per_partition) - set(selected))
        if outside:
            where = "does not exist" if set(outside) - set(existing) else "is not selected"
            raise ConfigError(
                f"{option} names partition {_list_ints(outside)} which {where} "
                f"(replaying {topic} partitions {_list_ints(selected)})"
            )
    return selected


def _list_ints(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class PartitionRange:
    """Offsets ``[start, stop)`` of one partition."""

    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class Plan:
    """What one run replays: a topic and one offset range per partition."""

    topic: str
    ranges: tuple[PartitionRange, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def describe(self) -> str:
        lines = [f"backfill of topic {self.topic}: {self.total} offsets"]
        for r in self.ranges:
            lines.append(
                f"  partition {r.partition}: offsets {r.start} to {r.stop} "
                f"(exclusive, {r.size} records)"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def build_plan(
    topic: str,
    partitions: Sequence[int],
    *,
    beginning: Mapping[int, int],
    end: Mapping[int, int],
    starts: Mapping[int, int | None],
    stops: Mapping[int, int | None],
) -> Plan:
    """Clamp the requested ``[start, stop)`` of each partition to what the broker holds.

    A missing start is the earliest retained offset, a missing stop the end offset
    captured at start-up. A start before the earliest retained offset begins there, a
    stop past the end offset stops there; both are reported as notes.
    """
    ranges: list[PartitionRange] = []
    notes: list[str] = []
    for p in partitions:
        first, last = beginning[p], end[p]
        want_start, want_stop = starts.get(p), stops.get(p)
        start = first if want_start is None else want_start
        stop = last if want_stop is None else want_stop
        if start < first:
            notes.append(
                f"partition {p}: offset {start} is no longer retained; starting at {first}"
            )
            start = first
        if start > last:
            notes.append(f"partition {p}: start {start} is past the end offset {last}")
            start = last
        if stop > last:
            notes.append(
                f"partition {p}: stop {stop} is past the end offset {last} captured at start; "
                f"stopping at {last}"
            )
            stop = last
        stop = max(stop, start)
        ranges.append(PartitionRange(p, start, stop))
    return Plan(topic, tuple(ranges), tuple(notes))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BackfillOptions:
    """One backfill run, as given on the command line."""

    topic: str | None = None
    partitions: tuple[int, ...] = ()
    from_offsets: OffsetSpec | None = None
    from_time: datetime | None = None
    to_offsets: OffsetSpec | None = None
    to_time: datetime | None = None
    concurrency: int | None = None
    verify: bool = False
    dry_run: bool = False
    progress: str = "auto"
    log_interval_s: float = 5.0
    batch_size: int = 2000

    def validate(self) -> None:
        """Reject contradictory options (a :class:`ConfigError`: exit status 2)."""
        if self.from_offsets is not None and self.from_time is not None:
            raise ConfigError("give either --from-offset or --from-time, not both")
        if self.to_offsets is not None and self.to_time is not None:
            raise ConfigError("give either --to-offset or --to-time, not both")
        if self.from_time and self.to_time and self.to_time <= self.from_time:
            raise ConfigError("--to-time must be later than --from-time")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        if self.dry_run and self.verify:
            raise ConfigError("--dry-run only counts: it cannot be combined with --verify")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ConfigError("--progress must be auto, bar, log or none")
        if self.log_interval_s <= 0 or self.batch_size < 1:
            raise ConfigError("--log-interval and the batch size must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BackfillOptions:
        """Build (and validate) options from the ``fileserver backfill`` arguments."""
        for p in args.partition or []:
            if p < 0:
                raise ConfigError(f"--partition {p}: partitions are non-negative")
        options = cls(
            topic=args.topic,
            partitions=tuple(args.partition or ()),
            from_offsets=parse_offsets(args.from_offset or [], "--from-offset"),
            from_time=parse_time(args.from_time, "--from-time") if args.from_time else None,
            to_offsets=parse_offsets(args.to_offset or [], "--to-offset"),
            to_time=parse_time(args.to_time, "--to-time") if args.to_time else None,
            concurrency=args.concurrency,
            verify=args.verify,
            dry_run=args.dry_run,
            progress=args.progress,
            log_interval_s=args.log_interval,
        )
        options.validate()
        return options


# --------------------------------------------------------------------------- outcomes


class Kind(StrEnum):
    """How one record ended in a backfill (worker outcomes plus backfill-only ones)."""

    INGESTED = Outcome.INGESTED.value
    ALREADY_PRESENT = "already_present"
    REPAIRED_OBJECT = "repaired_object"
    REPAIRED_ROW = "repaired_row"
    SKIPPED = Outcome.SKIPPED.value
    ALREADY_FAILED = "already_failed"
    DEAD_LETTERED = Outcome.DEAD_LETTERED.value
    PROBLEM = "problem"
    ERROR = "error"
    # --dry-run classes
    NEW = "new"
    WOULD_DEAD_LETTER = "would_dead_letter"


_FROM_OUTCOME = {
    Outcome.INGESTED: Kind.INGESTED,
    Outcome.DUPLICATE: Kind.ALREADY_PRESENT,
    Outcome.SKIPPED: Kind.SKIPPED,
    Outcome.DEAD_LETTERED: Kind.DEAD_LETTERED,
    Outcome.ALREADY_FAILED: Kind.ALREADY_FAILED,
}

LABELS: dict[Kind, str] = {
    Kind.INGESTED: "ingested",
    Kind.ALREADY_PRESENT: "already present",
    Kind.REPAIRED_OBJECT: "repaired object",
    Kind.REPAIRED_ROW: "repaired row",
    Kind.SKIPPED: "skipped types",
    Kind.ALREADY_FAILED: "already failed",
    Kind.DEAD_LETTERED: "dead-lettered",
    Kind.PROBLEM: "verify problems",
    Kind.ERROR: "errors",
}
DRY_LABELS: dict[Kind, str] = {
    Kind.NEW: "new (would ingest)",
    Kind.ALREADY_PRESENT: "already ingested",
    Kind.SKIPPED: "not a talk event",
    Kind.WOULD_DEAD_LETTER: "invalid (would dead-letter)",
    Kind.ALREADY_FAILED: "already failed",
}
_SHORT = {
    Kind.INGESTED: "ingested",
    Kind.ALREADY_PRESENT: "present",
    Kind.REPAIRED_OBJECT: "repaired",
    Kind.REPAIRED_ROW: "repaired",
    Kind.SKIPPED: "skipped",
    Kind.ALREADY_FAILED: "failed-before",
    Kind.DEAD_LETTERED: "dead",
    Kind.PROBLEM: "problems",
    Kind.ERROR: "errors",
    Kind.NEW: "new",
    Kind.WOULD_DEAD_LETTER: "invalid",
}
_BAD = (Kind.DEAD_LETTERED, Kind.PROBLEM, Kind.ERROR)
_ONLY_IF_ANY = (Kind.REPAIRED_OBJECT, Kind.REPAIRED_ROW, Kind.PROBLEM, Kind.ERROR)
MAX_LISTED = 20


@dataclass(frozen=True)
class RepairResult(Result):
    """A pipeline result that may say the row was repaired for an object already stored."""

    repaired_row: bool = False


@dataclass
class Summary:
    """What a backfill run did; :attr:`exit_code` tells success from partial failure."""

    plan: Plan | None
    dry_run: bool
    counts: Counter[Kind]
    elapsed_s: float
    interrupted: bool = False
    error: str | None = None
    resume: dict[int, int] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    breaker: str | None = None  # the breaker's detail when it stopped the run
    held: list[str] = field(default_factory=list)  # events it stopped on (not done)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0: every record ended as a row or a skip; 1: dead letters or errors; 4: stopped by
        the dead-letter breaker (before 130: it is why the run stopped); 130: interrupted."""
        if self.breaker is not None:
            return EXIT_BREAKER
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.error or any(self.counts[k] for k in _BAD):
            return EXIT_PARTIAL
        return EXIT_OK

    def render(self) -> str:
        """A small table, plus what to run to resume when interrupted."""
        labels = DRY_LABELS if self.dry_run else LABELS
        width = max(len(v) for v in labels.values()) + 2
        title = "dry run (nothing written)" if self.dry_run else "backfill summary"
        rows = [title, "-" * (width + 10)]
        for kind, label in labels.items():
            if kind in _ONLY_IF_ANY and not self.counts[kind]:
                continue
            rows.append(f"{label:<{width}}{self.counts[kind]:>10,}")
        rows.append("-" * (width + 10))
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        rows.append(f"{'total':<{width}}{self.done:>10,}")
        span = f"{self.plan.total:,} offsets in range; " if self.plan is not None else ""
        rows.append(f"{span}{self.elapsed_s:.1f}s, {rate:,.0f} events/s")
        rows.extend(f"repaired: {line}" for line in self.repairs[:MAX_LISTED])
        rows.extend(f"problem: {line}" for line in self.problems[:MAX_LISTED])
        if len(self.problems) > MAX_LISTED:
            rows.append(f"... and {len(self.problems) - MAX_LISTED} more problems (see the log)")
        if self.error:
            rows.append(f"error: {self.error}")
        if self.breaker is not None:
            rows.append(
                "stopped by the dead-letter breaker: no new events were started"
                + ("" if self.interrupted else ", the events in flight finished")
            )
            rows.append(f"breaker: {self.breaker}")
            rows.extend(
                f"held (not dead-lettered, redone on resume): {line}"
                for line in self.held[:MAX_LISTED]
            )
            if len(self.held) > MAX_LISTED:
                rows.append(f"... and {len(self.held) - MAX_LISTED} more held (see the log)")
        if self.interrupted:
            rows.append("interrupted: in-flight events were abandoned (a later run redoes them)")
        stopped = self.interrupted or self.breaker is not None
        if stopped and self.resume and self.plan is not None:
            stops = {r.partition: r.stop for r in self.plan.ranges}
            args = " ".join(f"--from-offset {p}:{o}" for p, o in sorted(self.resume.items()))
            args += " " + " ".join(f"--to-offset {p}:{stops[p]}" for p in sorted(self.resume))
            rows.append(f"resume with: fileserver backfill --topic {self.plan.topic} {args}")
        if self.breaker is not None:
            rows.append(
                "to go on: fix the cause, then run the resume command; or run it with "
                "FILESERVER_DLQ_MAX_CONSECUTIVE=0 to dead-letter them all"
            )
        rows.append(f"exit status {self.exit_code}")
        return "\n".join(rows)

    def one_line(self) -> str:
        return " ".join(f"{k.value}={n}" for k, n in sorted(self.counts.items()) if n)


@dataclass
class Tally:
    """Running counts shared by the reader, the tasks and the progress display."""

    counts: Counter[Kind] = field(default_factory=Counter)
    repairs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    in_flight: int = 0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: Kind, n: int = 1) -> None:
        self.counts[kind] += n


# --------------------------------------------------------------------------- database


def _object_matches(stored: StoredObject | None, size: int, md5: str) -> bool:
    if stored is None or stored.size != size:
        return False
    return stored.metadata.get("md5", md5).lower() == md5.lower()


# --------------------------------------------------------------------------- the run


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
        self._retry = RetryPolicy()
        #: Set by the first event the dead-letter breaker would hold: the run stops there.
        self.halted: BreakerOpen | None = None
        self.held: list[str] = []
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
            present = await self._retrying(
                "recordings look-up", lambda: self.runtime.repo.existing_source_urls(urls)
            )
        rest = [i for i, e in talk.items() if e.file_path not in present] + sorted(invalid)
        failed: set[tuple[int, int]] = set()
        if rest:
            positions = [(records[i].partition, records[i].offset) for i in rest]
            failed = await self._retrying(
                "ingest_failures look-up",
                lambda: self.runtime.repo.failed_positions(self.plan.topic, positions),
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
        self.held.append(f"{record.source} ({exc.reason})")
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

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a batched look-up while a dependency is down (like the worker, forever)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                value = await call()
            except DependencyUnavailable as exc:
                self.runtime.health.degraded(str(exc))
                delay = self._retry.delay(attempt, exc.retry_after)
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
            else:
                if attempt > 1:
                    self.runtime.health.recovered()
                return value

    # -- events without a row: the worker's path

    async def _ingest(self, record: SourceRecord) -> Kind:
        processor: Processor = self._verifier if self.options.verify else self.runtime.processor
        result = await processor.process(record)
        if isinstance(result, RepairResult) and result.repaired_row:
            line = f"row for stored object {result.s3_key} ({record.source})"
            log.warning("repaired %s", line)
            self.tally.repairs.append(line)
            return Kind.REPAIRED_ROW
        return _FROM_OUTCOME[result.outcome]

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
            had_object = _object_matches(stored, download.size, download.md5)
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
        """Re-download, compare with the row and the stored object, repair the object."""
        started = time.monotonic()
        attempt = 0
        retry_s = self.runtime.settings.source_retry_s
        while True:
            attempt += 1
            try:
                kind = await self._check_present(record, event)
            except DependencyUnavailable as exc:
                self.runtime.health.degraded(str(exc))
                await asyncio.sleep(self._retry.delay(attempt, exc.retry_after))
            except SourceUnavailable as exc:
                if time.monotonic() - started >= retry_s:
                    return await self._check_object_only(record, event, exc.detail)
                await asyncio.sleep(self._retry.delay(attempt, exc.retry_after))
            except PermanentError as exc:
                return await self._check_object_only(record, event, str(exc))
            else:
                if attempt > 1:
                    self.runtime.health.recovered()
                return kind

    async def _check_present(self, record: SourceRecord, event: TalkEvent) -> Kind:
        row = await self.runtime.repo.recording_row(event.file_path)
        if row is None:  # deleted since the batch look-up: ingest it like a new event
            return await self._ingest(record)
        store = self.runtime.store
        async with self.runtime.fetcher.download(event.file_path) as download:
            if download.md5 != row.md5 or download.size != row.size_bytes:
                return self._problem(
                    record,
                    f"the source now has md5 {download.md5} ({download.size} bytes) but the row "
                    f"says {row.md5} ({row.size_bytes} bytes); left unchanged",
                )
            key = object_key(event, download.md5)
            if row.s3_bucket != store.bucket or row.s3_key != key:
                return self._problem(
                    record,
                    f"the row points at {row.s3_bucket}/{row.s3_key}, expected "
                    f"{store.bucket}/{key}; left unchanged",
                )
            stored = await store.head(key)
            if _object_matches(stored, row.size_bytes, row.md5):
                return Kind.ALREADY_PRESENT
            await self.runtime.ingestor.upload(event, download)
        why = "missing" if stored is None else f"different ({stored.size} bytes)"
        line = f"object {key} was {why} ({record.source})"
        log.warning("repaired %s", line)
        self.tally.repairs.append(line)
        return Kind.REPAIRED_OBJECT

    async def _check_object_only(self, record: SourceRecord, event: TalkEvent, why: str) -> Kind:
        """The source cannot be re-downloaded: at least check the stored object."""
        attempt = 0
        while True:
            attempt += 1
            try:
                row = await self.runtime.repo.recording_row(event.file_path)
                stored = await self.runtime.store.head(row.s3_key) if row else None
                break
            except DependencyUnavailable as exc:
                self.runtime.health.degraded(str(exc))
                await asyncio.sleep(self._retry.delay(attempt, exc.retry_after))
        if attempt > 1:
            self.runtime.health.recovered()
        if row is not None and _object_matches(stored, row.size_bytes, row.md5):
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


# --------------------------------------------------------------------------- planning (I/O)


async def _topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    # Listing every topic first never auto-creates a mistyped one.
    if topic not in await consumer.topics():
        raise ConfigError(f"topic {topic!r} does not exist (set FILESERVER_TOPIC or --topic)")
    # aiokafka has no public call that loads one topic's partitions into the client.
    await consumer._client.add_topic(topic)
    partitions = set(consumer.partitions_for_topic(topic) or ())
    if not partitions:
        raise ConfigError(f"topic {topic!r} has no partitions in the broker's metadata")
    return partitions


async def resolve_plan(consumer: AIOKafkaConsumer, topic: str, options: BackfillOptions) -> Plan:
    """Resolve times to offsets and snapshot the end offsets: the run's fixed range."""
    available = await _topic_partitions(consumer, topic)
    selected = select_partitions(
        available, options.partitions, options.from_offsets, options.to_offsets, topic=topic
    )
    tps = [TopicPartition(topic, p) for p in selected]
    async with asyncio.timeout(60):
        beginning = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
        end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        starts: dict[int, int | None] = {p: None for p in selected}
        stops: dict[int, int | None] = {p: None for p in selected}
        if options.from_time is not None:
            millis = to_millis(options.from_time)
            found = await consumer.offsets_for_times({tp: millis for tp in tps})
            for tp in tps:  # no record at or after that time: nothing to replay there
                hit = found.get(tp)
                starts[tp.partition] = hit.offset if hit is not None else end[tp.partition]
        elif options.from_offsets is not None:
            starts = {p: options.from_offsets.get(p) for p in selected}
        if options.to_time is not None:
            millis = to_millis(options.to_time)
            found = await consumer.offsets_for_times({tp: millis for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                stops[tp.partition] = hit.offset if hit is not None else None
        elif options.to_offsets is not None:
            stops = {p: options.to_offsets.get(p) for p in selected}
    return build_plan(topic, selected, beginning=beginning, end=end, starts=starts, stops=stops)


# --------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _ClearLine(logging.Filter):
    """Erases the progress line before a log record is written to the same terminal."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class Progress:
    """A single updating line on a terminal, or a log line every few seconds."""

    def __init__(
        self,
        tally: Tally,
        total: int,
        *,
        mode: str,
        stream: TextIO,
        interval_s: float,
        status: Callable[[], str | None] = lambda: None,
    ) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode
        self.tally = tally
        self.total = total
        self.stream = stream
        self.interval_s = interval_s
        self.status = status
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=50)
        self._drawn = False
        self._filter = _ClearLine(self)

    def line(self) -> str:
        """``done/total pct | rate | ETA | per-outcome counts | in flight [| paused: why]``."""
        now = time.monotonic()
        done = self.tally.done
        self._samples.append((now, done))
        t0, d0 = self._samples[0]
        if now - t0 < 1.0:
            t0, d0 = self.started, 0
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        left = max(0, self.total - done)
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        counts = " ".join(f"{_SHORT[k]} {n:,}" for k, n in sorted(self.tally.counts.items()) if n)
        paused = self.status()
        return (
            f"{done:,}/{self.total:,} {pct:.1f}% | {rate:,.0f}/s | ETA {eta} | "
            f"{counts or '-'} | in flight {self.tally.in_flight}"
            + (f" | paused: {paused}" if paused else "")
        )

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def draw(self) -> None:
        import shutil

        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r\x1b[K" + ("backfill " + self.line())[:width])
        self.stream.flush()
        self._drawn = True

    async def run(self) -> None:
        """Until cancelled: redraw the line (terminal) or log the progress (otherwise)."""
        if self.mode == "none":
            return
        if self.mode == "bar":
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)
        try:
            while True:
                if self.mode == "bar":
                    self.draw()
                    await asyncio.sleep(0.25)
                else:
                    await asyncio.sleep(self.interval_s)
                    log.info("progress %s", self.line())
        finally:
            self.clear()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)


# --------------------------------------------------------------------------- entry points


class _Job:
    def __init__(
        self, settings: Settings, options: BackfillOptions, out: TextIO, err: TextIO
    ) -> None:
        self.settings = settings
        self.options = options
        self.out = out
        self.err = err
        self.tally = Tally()
        self.plan: Plan | None = None
        self.backfill: Backfill | None = None
        self.started: float | None = None

    async def run(self) -> None:
        settings = self.settings
        topic = self.options.topic or settings.topic
        # hold=False: an event the dead-letter breaker would hold raises BreakerOpen, and
        # the run stops (exit status 4) instead of waiting for the cause to go away.
        async with open_runtime(settings, hold=False) as runtime:
            await preflight(runtime)
            consumer = make_reader(settings)
            try:
                await consumer.start()
            except KafkaError as exc:
                await consumer.stop()
                raise DependencyUnavailable(
                    "kafka",
                    f"cannot reach FILESERVER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}: {exc}",
                ) from None
            try:
                self.plan = await resolve_plan(consumer, topic, self.options)
                print(self.plan.describe(), file=self.out, flush=True)
                log.info(
                    "backfill plan: topic %s, %d offsets, %s%s",
                    topic,
                    self.plan.total,
                    " ".join(f"{r.partition}:[{r.start},{r.stop})" for r in self.plan.ranges),
                    " (dry run)" if self.options.dry_run else "",
                )
                self.backfill = Backfill(
                    runtime, self.plan, self.options, self.tally, concurrency=settings.concurrency
                )
                progress = Progress(
                    self.tally,
                    self.plan.total,
                    mode=self.options.progress,
                    stream=self.err,
                    interval_s=self.options.log_interval_s,
                    status=lambda: None if runtime.health.ok else runtime.health.reason,
                )
                self.started = time.monotonic()
                ticker = asyncio.create_task(progress.run())
                try:
                    await self.backfill.run(consumer)
                finally:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
            finally:
                await consumer.stop()

    def summary(self, *, interrupted: bool, error: str | None) -> Summary:
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        halted = self.backfill.halted if self.backfill else None
        stopped = interrupted or halted is not None
        resume = self.backfill.resume_offsets() if self.backfill and stopped else {}
        return Summary(
            plan=self.plan,
            dry_run=self.options.dry_run,
            counts=Counter(self.tally.counts),
            elapsed_s=elapsed,
            interrupted=interrupted,
            error=error,
            resume=resume,
            repairs=list(self.tally.repairs),
            problems=list(self.tally.problems),
            breaker=halted.detail if halted is not None else None,
            held=list(self.backfill.held) if self.backfill else [],
        )


def effective_settings(settings: Settings, options: BackfillOptions) -> Settings:
    """The settings with ``--concurrency`` applied (pools are sized from it)."""
    if options.concurrency is None:
        return settings
    n = options.concurrency
    return replace(settings, concurrency=n, max_pending=max(settings.max_pending, n))


async def run_backfill(
    settings: Settings,
    options: BackfillOptions,
    *,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Summary:
    """Run one backfill; setting ``stop`` ends it early, with a summary of what was done.

    An event the dead-letter breaker would hold ends it early too (exit status 4), with
    the same resume command: a backfill never waits behind the breaker.

    Raises :class:`ConfigError` (bad range, missing topic, unreachable database or
    bucket) and :class:`DependencyUnavailable` (broker unreachable) before any record is
    read; afterwards every failure is in the summary.
    """
    options.validate()
    out = out or sys.stdout
    err = err or sys.stderr
    job = _Job(effective_settings(settings, options), options, out, err)
    work = asyncio.create_task(job.run(), name="backfill")
    waiters: set[asyncio.Future[Any]] = {work}
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopper is not None:
        waiters.add(stopper)
    interrupted = False
    error: str | None = None
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            interrupted = True
            log.warning("interrupted: stopping the backfill")
            work.cancel()
        try:
            await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not interrupted or (current is not None and current.cancelling()):
                raise
        except (ConfigError, DependencyUnavailable) as exc:
            if job.plan is None:
                raise
            log.exception("backfill failed")
            error = str(exc)
        except Exception as exc:
            log.exception("backfill failed")
            error = f"{type(exc).__name__}: {exc}"
    finally:
        if stopper is not None:
            stopper.cancel()
        if not work.done():
            work.cancel()
    summary = job.summary(interrupted=interrupted, error=error)
    print(summary.render(), file=out, flush=True)
    if summary.breaker is not None:
        state = f"stopped by the dead-letter breaker ({summary.breaker})"
    else:
        state = "interrupted" if interrupted else "finished"
    log.info(
        "backfill %s: %s (exit status %d)",
        state,
        summary.one_line() or "nothing to do",
        summary.exit_code,
    )
    return summary


async def _main(settings: Settings, options: BackfillOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            return
        print(f"\n{sig.name}: stopping (again to abort at once)", file=sys.stderr, flush=True)
        stop.set()
        loop.remove_signal_handler(sig)  # a second Ctrl-C gets Python's default behaviour

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        summary = await run_backfill(settings, options, stop=stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return summary.exit_code


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """``fileserver backfill``: returns the exit status (0, 1, 4 or 130; see :class:`Summary`)."""
    options = BackfillOptions.from_args(args)
    return asyncio.run(_main(settings, options))
