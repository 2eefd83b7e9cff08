"""The dead-letter circuit breaker and the intake window (in-order acks, abandon, bounds)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import PermanentError, Reason
from fileserver.pipeline import Outcome, Result
from fileserver.processor import DeadLetterLimit, Health, Processor
from fileserver.record import SourceRecord
from fileserver.repository import Repository
from fileserver.retry import RetryPolicy
from fileserver.worker import IntakeWindow
from tests.unit.test_processor import (
    RECORD,
    Clock,
    FakeRepo,
    FakeSink,
    ScriptedIngest,
    ok,
)


def test_breaker_opens_after_n_consecutive_same_reason() -> None:
    b = DeadLetterLimit(max_consecutive=3, cooldown_s=5)
    assert [b.allow("invalid_audio") for _ in range(3)] == [True, True, True]
    assert b.open, "the 3rd dead letter opens it: the next failure is held"
    assert b.allow("invalid_audio") is False
    assert b.open
    assert b.allow("invalid_event") is False, "an open breaker holds every reason"
    assert "3 consecutive 'invalid_audio'" in b.describe()
    b.success()
    assert not b.open and b.allow("invalid_audio")


def test_breaker_counts_only_consecutive_failures_of_one_reason() -> None:
    b = DeadLetterLimit(max_consecutive=3)
    for reason in ["a", "a", "b", "b", "a", "a"]:
        assert b.allow(reason)
    b.success()
    assert all(b.allow("a") for _ in range(3))


def test_breaker_disabled_with_zero() -> None:
    b = DeadLetterLimit(max_consecutive=0)
    assert all(b.allow("x") for _ in range(10_000))
    assert not b.open


async def test_processor_holds_events_while_the_breaker_is_open(clock: Clock) -> None:
    bad = PermanentError(Reason.INVALID_AUDIO, "html page")
    steps = [bad, bad, bad, ok()]  # the gateway is fixed after the 3rd attempt
    ingest = ScriptedIngest(steps)
    repo, sink = FakeRepo(), FakeSink()
    processor = Processor(
        ingest,
        cast(Repository, repo),
        cast(DeadLetterSink, sink),
        source_retry_s=60,
        retry=RetryPolicy(initial_s=0.5, max_s=8.0),
        breaker=DeadLetterLimit(max_consecutive=2, cooldown_s=30),
        sleep=clock.sleep,
    )
    clock.health = processor.health
    other = [SourceRecord("t", 0, i, b"{}") for i in range(2)]
    for record in other:  # two dead letters of one reason open the breaker
        assert (await processor.process(record)).outcome is Outcome.DEAD_LETTERED
    assert processor.breaker.open
    # the third consecutive invalid_audio is held, retried after the cooldown, then succeeds
    result = await processor.process(RECORD)
    assert result.outcome is Outcome.INGESTED
    assert len(sink.published) == 2
    assert clock.sleeps == [30]
    assert clock.health_at_sleep == [False], "intake is paused while the breaker is open"
    assert processor.health.ok and not processor.breaker.open


class FakeProcessor:
    """Finishes each record when the test releases it."""

    def __init__(self) -> None:
        self.health = Health()
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []

    async def process(self, record: SourceRecord) -> Result:
        self.started.append(record.offset)
        await self.gates.setdefault(record.offset, asyncio.Event()).wait()
        return Result(Outcome.INGESTED, record)

    def release(self, offset: int) -> None:
        self.gates.setdefault(offset, asyncio.Event()).set()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_window_acks_in_partition_order() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    window = IntakeWindow(cast(Processor, fake), acked.append, concurrency=8, max_pending=100)
    for offset in range(5):
        await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    await _settle()
    assert fake.started == [0, 1, 2, 3, 4]
    for offset in (4, 2, 1):
        fake.release(offset)
    await _settle()
    assert acked == [], "nothing may be acked while offset 0 is in flight"
    fake.release(0)
    await _settle()
    assert acked == [0, 1, 2]
    fake.release(3)
    await _settle()
    assert acked == [0, 1, 2, 3, 4]
    assert window.pending == 0 and window.in_flight == 0


async def test_window_abandon_forgets_without_acking() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    forgotten: list[int] = []
    window = IntakeWindow(
        cast(Processor, fake), acked.append, forget=forgotten.append, concurrency=8, max_pending=100
    )
    for offset in range(3):
        await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    await _settle()
    fake.release(1)
    await _settle()
    assert await window.drain(grace_s=0.05) == 3
    assert acked == [] and sorted(forgotten) == [0, 1, 2]
    assert window.pending == 0 and window.in_flight == 0


async def test_window_bounds_concurrency_and_pending() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    window = IntakeWindow(cast(Processor, fake), acked.append, concurrency=2, max_pending=3)
    for offset in range(3):
        await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    await _settle()
    assert fake.started == [0, 1], "only `concurrency` events run at once"
    blocked = asyncio.create_task(window.submit("p0", SourceRecord("t", 0, 3, b""), 3))
    await _settle()
    assert not blocked.done(), "submit waits while max_pending events are unacked"
    fake.release(0)
    await _settle()
    assert blocked.done() and acked == [0]
    for offset in (1, 2, 3):
        fake.release(offset)
    await _settle()
    assert acked == [0, 1, 2, 3]


async def test_window_waits_while_health_is_degraded() -> None:
    fake = FakeProcessor()
    fake.health.degraded("s3 down")
    window = IntakeWindow(cast(Processor, fake), lambda _t: None, concurrency=4, max_pending=10)
    await window.submit("p0", SourceRecord("t", 0, 0, b""), 0)
    await _settle()
    assert fake.started == []
    fake.health.recovered()
    await _settle()
    assert fake.started == [0]
    fake.release(0)
    await _settle()


@pytest.mark.parametrize("max_consecutive", [1, 5])
def test_breaker_describe_names_the_setting(max_consecutive: int) -> None:
    b = DeadLetterLimit(max_consecutive=max_consecutive)
    for _ in range(max_consecutive):
        b.allow("too_large")
    assert f"FILESERVER_DLQ_MAX_CONSECUTIVE={max_consecutive}" in b.describe()
