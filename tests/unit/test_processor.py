"""Processor: the retry and dead-letter policy, with in-memory fakes and a fake clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import cast

import pytest

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import (
    DependencyUnavailable,
    PermanentError,
    Reason,
    SourceUnavailable,
)
from fileserver.pipeline import Outcome, Result
from fileserver.processor import DeadLetterLimit, Health, Processor
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, Repository
from fileserver.retry import RetryPolicy

URL = "https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3"
TALK = json.dumps(
    {
        "msg_type": 1,
        "ip": "127.0.0.1",
        "ptt_msg": {
            "uid": "14",
            "md5": "md5",
            "grp_id": "1",
            "timestamp": "1569569697",
            "file_path": URL,
        },
    }
).encode()
RECORD = SourceRecord("janus-events", 3, 42, TALK, key=b"k")

Step = BaseException | Result


class Clock:
    """A fake monotonic clock that only moves when the processor sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.health_at_sleep: list[bool] = []
        self.health: Health | None = None

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        assert delay >= 0
        self.sleeps.append(delay)
        if self.health is not None:
            self.health_at_sleep.append(self.health.ok)
        self.now += delay


class FakeRepo:
    """The two failure-row methods the processor uses, optionally failing first."""

    def __init__(
        self,
        has_failure_errors: int = 0,
        insert_errors: int = 0,
        insert_bugs: int = 0,
    ) -> None:
        self.rows: dict[tuple[str, int, int], NewFailure] = {}
        self.inserts: list[NewFailure] = []
        self.refused: list[NewFailure] = []
        self._has_failure_errors = has_failure_errors
        self._insert_errors = insert_errors
        self._insert_bugs = insert_bugs

    async def has_failure(self, topic: str, partition: int, offset: int) -> bool:
        if self._has_failure_errors:
            self._has_failure_errors -= 1
            raise DependencyUnavailable("postgres", "connection refused")
        return (topic, partition, offset) in self.rows

    async def insert_failure(self, row: NewFailure) -> bool:
        if self._insert_errors:
            self._insert_errors -= 1
            raise DependencyUnavailable("postgres", "connection reset")
        if self._insert_bugs:  # e.g. a DataError on text the database cannot store
            self._insert_bugs -= 1
            self.refused.append(row)
            raise ValueError("invalid byte sequence for encoding UTF8")
        self.inserts.append(row)
        key = (row.kafka_topic, row.kafka_partition, row.kafka_offset)
        if key in self.rows:
            return False
        self.rows[key] = row
        return True


class FakeSink:
    """An in-memory dead-letter topic; the first ``errors`` publishes fail."""

    def __init__(self, errors: int = 0) -> None:
        self.published: list[tuple[SourceRecord, str, str]] = []
        self.attempts = 0
        self._errors = errors

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        self.attempts += 1
        if self._errors:
            self._errors -= 1
            raise DependencyUnavailable("dead-letter topic", "NotLeaderForPartitionError")
        self.published.append((record, reason, detail))


class ScriptedIngest:
    """Raises or returns the scripted steps in turn; the last one repeats forever."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def __call__(self, record: SourceRecord) -> Result:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, BaseException):
            raise step
        return step


def make(
    clock: Clock,
    steps: Iterable[Step],
    *,
    repo: FakeRepo | None = None,
    sink: FakeSink | None = None,
    source_retry_s: float = 60.0,
    retry: RetryPolicy | None = None,
    internal_error_attempts: int = 5,
) -> tuple[Processor, ScriptedIngest, FakeRepo, FakeSink]:
    ingest = ScriptedIngest(steps)
    repo = repo or FakeRepo()
    sink = sink or FakeSink()
    processor = Processor(
        ingest,
        cast(Repository, repo),
        cast(DeadLetterSink, sink),
        source_retry_s=source_retry_s,
        internal_error_attempts=internal_error_attempts,
        retry=retry or RetryPolicy(initial_s=0.5, max_s=8.0),
        sleep=clock.sleep,
    )
    clock.health = processor.health
    return processor, ingest, repo, sink


def repeat(step: Step, times: int) -> list[Step]:
    return [step] * times


def ok(record: SourceRecord = RECORD) -> Result:
    return Result(Outcome.INGESTED, record)


# --- permanent errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        Reason.INVALID_EVENT,
        Reason.SOURCE_FORBIDDEN,
        Reason.SOURCE_NOT_FOUND,
        Reason.TOO_LARGE,
        Reason.MD5_MISMATCH,
        Reason.INVALID_AUDIO,
        Reason.DURATION_OUT_OF_RANGE,
    ],
)
async def test_permanent_error_is_dead_lettered_once(clock: Clock, reason: Reason) -> None:
    processor, ingest, repo, sink = make(clock, [PermanentError(reason, "the detail")])
    result = await processor.process(RECORD)

    assert result.outcome is Outcome.DEAD_LETTERED
    assert (result.reason, result.detail, result.record) == (reason.value, "the detail", RECORD)
    assert ingest.calls == 1
    assert sink.published == [(RECORD, reason.value, "the detail")]
    assert repo.inserts == [
        NewFailure(
            kafka_topic="janus-events",
            kafka_partition=3,
            kafka_offset=42,
            reason=reason.value,
            detail="the detail",
            source_url=URL,
            payload=TALK,
        )
    ]
    assert clock.sleeps == []
    assert processor.health.ok


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.MALFORMED_JSON),
        (b"\xff\xfe", Reason.MALFORMED_JSON),
        (b"[]", Reason.INVALID_EVENT),
        (b'{"msg_type": 2}', Reason.INVALID_EVENT),
    ],
)
async def test_failure_row_of_an_unparseable_record(
    clock: Clock, value: bytes | None, reason: Reason
) -> None:
    record = SourceRecord("janus-events", 0, 7, value)
    processor, _, repo, sink = make(clock, [PermanentError(reason, "bad")])
    result = await processor.process(record)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert len(sink.published) == 1
    (row,) = repo.inserts
    assert (row.source_url, row.payload, row.reason) == (None, value, reason.value)


async def test_existing_failure_row_means_no_second_publish(clock: Clock) -> None:
    processor, _, repo, sink = make(clock, [PermanentError(Reason.INVALID_AUDIO, "again")])
    first = await processor.process(RECORD)
    second = await processor.process(RECORD)  # a redelivery after a crash before the commit
    assert first.outcome is second.outcome is Outcome.DEAD_LETTERED
    assert len(sink.published) == 1
    assert len(repo.inserts) == 1


async def test_failure_row_present_before_first_attempt(clock: Clock) -> None:
    repo = FakeRepo()
    repo.rows[(RECORD.topic, RECORD.partition, RECORD.offset)] = cast(NewFailure, object())
    processor, _, _, sink = make(clock, [PermanentError(Reason.TOO_LARGE, "x")], repo=repo)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.reason == "too_large"
    assert sink.attempts == 0
    assert repo.inserts == []


async def test_failure_rows_are_per_offset(clock: Clock) -> None:
    processor, _, repo, sink = make(clock, [PermanentError(Reason.INVALID_EVENT, "x")])
    other = SourceRecord(RECORD.topic, RECORD.partition, RECORD.offset + 1, RECORD.value)
    await processor.process(RECORD)
    await processor.process(other)
    assert [r.offset for r, _, _ in sink.published] == [42, 43]
    assert len(repo.rows) == 2


# --- success and skipped pass through ------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [
        Result(Outcome.INGESTED, RECORD, md5="0" * 32, s3_key="k"),
        Result(Outcome.DUPLICATE, RECORD),
        Result(Outcome.SKIPPED, RECORD, skipped_type=3),
    ],
)
async def test_results_pass_through(clock: Clock, result: Result) -> None:
    processor, ingest, repo, sink = make(clock, [result])
    assert await processor.process(RECORD) is result
    assert ingest.calls == 1
    assert (sink.attempts, repo.inserts, clock.sleeps) == (0, [], [])


# --- source unavailable --------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 3, 6])
async def test_source_unavailable_retried_then_ingested(clock: Clock, failures: int) -> None:
    steps: list[Step] = [*repeat(SourceUnavailable("HTTP 503"), failures), ok()]
    processor, ingest, repo, sink = make(clock, steps, source_retry_s=300.0)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.INGESTED
    assert ingest.calls == failures + 1
    assert len(clock.sleeps) == failures
    assert (sink.attempts, repo.inserts) == (0, [])
    assert processor.health.ok
    assert all(clock.health_at_sleep)  # a single bad source does not pause the worker


async def test_source_unavailable_backoff_grows(clock: Clock) -> None:
    steps: list[Step] = [*repeat(SourceUnavailable("timeout"), 5), ok()]
    processor, *_ = make(clock, steps, retry=RetryPolicy(initial_s=1.0, max_s=4.0))
    await processor.process(RECORD)
    ceilings = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= s <= c for s, c in zip(clock.sleeps, ceilings, strict=True))


async def test_source_retry_after_is_honoured(clock: Clock) -> None:
    steps: list[Step] = [*repeat(SourceUnavailable("HTTP 429", retry_after=3.0), 2), ok()]
    processor, *_ = make(clock, steps)
    assert (await processor.process(RECORD)).outcome is Outcome.INGESTED
    assert clock.sleeps == [3.0, 3.0]


@pytest.mark.parametrize("source_retry_s", [5.0, 30.0, 300.0])
async def test_source_unavailable_beyond_budget_is_dead_lettered(
    clock: Clock, source_retry_s: float
) -> None:
    processor, ingest, repo, sink = make(
        clock, [SourceUnavailable("HTTP 503 from origin")], source_retry_s=source_retry_s
    )
    start = clock.now
    result = await processor.process(RECORD)

    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.reason == "source_unavailable"
    assert result.detail is not None
    assert "FILESERVER_SOURCE_RETRY_S" in result.detail
    assert "HTTP 503 from origin" in result.detail
    assert f"{ingest.calls} attempts" in result.detail
    # retried for the whole budget, and gave up within one backoff of its end
    assert clock.now - start >= source_retry_s
    assert clock.now - start - clock.sleeps[-1] < source_retry_s
    assert ingest.calls == len(clock.sleeps) + 1 > 1
    assert [(r, reason) for r, reason, _ in sink.published] == [(RECORD, "source_unavailable")]
    assert [row.reason for row in repo.inserts] == ["source_unavailable"]


async def test_zero_source_budget_dead_letters_at_once(clock: Clock) -> None:
    processor, ingest, _, sink = make(clock, [SourceUnavailable("refused")], source_retry_s=0)
    result = await processor.process(RECORD)
    assert result.reason == "source_unavailable"
    assert ingest.calls == 1
    assert clock.sleeps == []
    assert len(sink.published) == 1


async def test_source_budget_uses_wall_time_not_attempts(clock: Clock) -> None:
    # a huge Retry-After (capped at max_s=8) burns the 10 s budget in two attempts
    steps: list[Step] = [SourceUnavailable("HTTP 429", retry_after=1000.0)]
    processor, ingest, *_ = make(clock, steps, source_retry_s=10.0)
    result = await processor.process(RECORD)
    assert result.reason == "source_unavailable"
    assert clock.sleeps == [8.0, 8.0]
    assert ingest.calls == 3


# --- dependency outages --------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 4, 50])
async def test_dependency_outage_degrades_health_and_is_never_dead_lettered(
    clock: Clock, failures: int
) -> None:
    steps: list[Step] = [*repeat(DependencyUnavailable("s3", "connection refused"), failures), ok()]
    # a tiny source budget: dependency outages must not be limited by it
    processor, ingest, repo, sink = make(clock, steps, source_retry_s=1.0)
    result = await processor.process(RECORD)

    assert result.outcome is Outcome.INGESTED
    assert ingest.calls == failures + 1
    assert clock.health_at_sleep == [False] * failures  # degraded during the outage
    assert processor.health.ok  # and recovered after
    assert processor.health.reason is None
    assert (sink.attempts, repo.inserts) == (0, [])


async def test_health_reason_names_the_dependency(clock: Clock) -> None:
    seen: list[str | None] = []
    processor, *_ = make(clock, [DependencyUnavailable("postgres", "too many clients"), ok()])

    async def sleep(delay: float) -> None:
        seen.append(processor.health.reason)

    processor._sleep = sleep
    await processor.process(RECORD)
    assert seen == ["postgres: too many clients"]


async def test_dependency_retry_after_is_honoured(clock: Clock) -> None:
    steps: list[Step] = [DependencyUnavailable("s3", "SlowDown", retry_after=2.0), ok()]
    processor, *_ = make(clock, steps)
    await processor.process(RECORD)
    assert clock.sleeps == [2.0]


async def test_long_dependency_outage_is_waited_out(clock: Clock) -> None:
    # ~9 hours of a Postgres outage at the default backoff (capped at 30 s): well over a
    # thousand attempts; the event must still be ingested in the end, never raised or dropped
    steps: list[Step] = [*repeat(DependencyUnavailable("postgres", "down"), 1100), ok()]
    processor, ingest, _, sink = make(clock, steps, retry=RetryPolicy())
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.INGESTED
    assert ingest.calls == 1101
    assert sink.attempts == 0
    assert processor.health.ok


async def test_source_then_dependency_then_success(clock: Clock) -> None:
    steps: list[Step] = [
        SourceUnavailable("503"),
        DependencyUnavailable("s3", "down"),
        SourceUnavailable("503"),
        ok(),
    ]
    processor, *_ = make(clock, steps)
    assert (await processor.process(RECORD)).outcome is Outcome.INGESTED
    # A source error says nothing about S3: intake stays paused until a step reaches it.
    assert clock.health_at_sleep == [True, False, False]
    assert processor.health.ok


# --- unexpected exceptions (bugs) ----------------------------------------------------------


@pytest.mark.parametrize(
    "error", [KeyError("uid"), ValueError("boom"), RuntimeError("x"), ZeroDivisionError()]
)
async def test_unexpected_exception_is_retried_not_dropped(
    clock: Clock, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    steps: list[Step] = [error, error, ok()]
    processor, ingest, repo, sink = make(clock, steps, source_retry_s=0.0)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.INGESTED
    assert ingest.calls == 3
    assert clock.health_at_sleep == [True, True], "a bug in one event pauses nothing"
    assert processor.health.ok
    assert (sink.attempts, repo.inserts) == (0, [])
    assert any(r.exc_info and r.exc_info[1] is error for r in caplog.records)


async def test_unexpected_exception_then_permanent_error(clock: Clock) -> None:
    steps: list[Step] = [KeyError("x"), PermanentError(Reason.MD5_MISMATCH, "differs")]
    processor, _, repo, sink = make(clock, steps)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.reason == "md5_mismatch"
    assert len(sink.published) == len(repo.rows) == 1
    assert processor.health.ok


@pytest.mark.parametrize("attempts", [1, 3, 5])
async def test_a_bug_is_retried_a_bounded_number_of_times_then_dead_lettered(
    clock: Clock, attempts: int
) -> None:
    error = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    processor, ingest, repo, sink = make(
        clock, [error], source_retry_s=0.0, internal_error_attempts=attempts
    )
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.reason == "internal_error"
    assert ingest.calls == attempts, "retried, but only FILESERVER_INTERNAL_ERROR_ATTEMPTS times"
    assert len(clock.sleeps) == attempts - 1
    assert processor.health.ok, "a bug in one event never pauses intake"
    ((record, reason, detail),) = sink.published
    assert record is RECORD and reason == "internal_error"
    assert detail.startswith("UnicodeEncodeError: ")
    assert "test_processor.py:" in detail, "the detail carries a traceback summary"
    assert f"FILESERVER_INTERNAL_ERROR_ATTEMPTS={attempts}" in detail
    (row,) = repo.rows.values()
    assert row.payload == RECORD.value, "the dead letter keeps the bytes for redrive"


async def test_internal_error_is_never_held_by_an_open_breaker(clock: Clock) -> None:
    processor, _ingest, repo, _sink = make(clock, [RuntimeError("bug")], internal_error_attempts=2)
    processor.breaker = DeadLetterLimit(max_consecutive=1, cooldown_s=30)
    assert processor.breaker.allow("source_not_found")
    assert processor.breaker.open
    for offset in range(3):
        record = SourceRecord("t", 0, offset, b"{}")
        assert (await processor.process(record)).reason == "internal_error"
    assert 30 not in clock.sleeps, "nothing was held"
    assert len(repo.rows) == 3


async def test_failure_row_text_is_made_storable(clock: Clock) -> None:
    bad = PermanentError(Reason.INVALID_EVENT, "ip has \x00 and \ud800 in it")
    processor, _, repo, _sink = make(clock, [bad])
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    (row,) = repo.rows.values()
    assert "\x00" not in row.detail
    row.detail.encode("utf-8")  # no lone surrogate left
    assert row.payload == RECORD.value


async def test_failure_row_refused_by_the_database_is_written_plain(clock: Clock) -> None:
    bad = PermanentError(Reason.INVALID_AUDIO, "ünïcode détail")
    processor, _, repo, sink = make(clock, [bad], repo=FakeRepo(insert_bugs=1))
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert len(repo.refused) == 1 and len(sink.published) == 1, "published once"
    (row,) = repo.rows.values()
    assert row.detail.isascii() and row.source_url is None
    assert row.payload == RECORD.value
    assert processor.health.ok


async def test_cancellation_is_not_swallowed(clock: Clock) -> None:
    processor, _, repo, sink = make(clock, [asyncio.CancelledError()])
    with pytest.raises(asyncio.CancelledError):
        await processor.process(RECORD)
    assert (sink.attempts, repo.inserts) == (0, [])


# --- dead-letter sink and failure-row outages ----------------------------------------------


@pytest.mark.parametrize("errors", [1, 3, 10])
async def test_sink_outage_then_published_exactly_once(clock: Clock, errors: int) -> None:
    sink = FakeSink(errors=errors)
    processor, ingest, repo, _ = make(
        clock, [PermanentError(Reason.INVALID_AUDIO, "not mp3")], sink=sink
    )
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert ingest.calls == 1  # the event is not re-ingested, only the dead letter retried
    assert sink.attempts == errors + 1
    assert sink.published == [(RECORD, "invalid_audio", "not mp3")]
    assert len(repo.inserts) == 1
    assert clock.health_at_sleep == [False] * errors
    assert processor.health.ok


async def test_failure_lookup_outage_is_retried(clock: Clock) -> None:
    repo = FakeRepo(has_failure_errors=2)
    processor, _, _, sink = make(clock, [PermanentError(Reason.TOO_LARGE, "x")], repo=repo)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert len(sink.published) == 1
    assert len(repo.rows) == 1
    assert len(clock.sleeps) == 2
    assert processor.health.ok


async def test_failure_row_outage_still_ends_with_one_row(clock: Clock) -> None:
    repo = FakeRepo(insert_errors=2)
    processor, _, _, sink = make(clock, [PermanentError(Reason.TOO_LARGE, "x")], repo=repo)
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert len(repo.rows) == 1
    assert len(sink.published) == 1  # published once per call, whatever the row retries
    assert processor.health.ok


async def test_dead_letter_can_be_called_directly(clock: Clock) -> None:
    processor, ingest, repo, sink = make(clock, [ok()])
    result = await processor.dead_letter(RECORD, Reason.SOURCE_NOT_FOUND, "HTTP 404")
    assert (result.outcome, result.reason, result.detail) == (
        Outcome.DEAD_LETTERED,
        "source_not_found",
        "HTTP 404",
    )
    assert ingest.calls == 0
    assert sink.published == [(RECORD, "source_not_found", "HTTP 404")]
    assert repo.rows[("janus-events", 3, 42)].source_url == URL


# --- Health --------------------------------------------------------------------------------


async def test_health_transitions() -> None:
    health = Health()
    assert health.ok and health.reason is None
    await asyncio.wait_for(health.wait_ok(), 1)

    health.degraded("s3: down")
    health.degraded("postgres: down")
    assert not health.ok
    assert health.reason == "postgres: down"
    waiter = asyncio.ensure_future(health.wait_ok())
    await asyncio.sleep(0)
    assert not waiter.done()

    health.recovered()
    await asyncio.wait_for(waiter, 1)
    assert health.ok and health.reason is None
    health.recovered()  # idempotent
    assert health.ok
