"""The dead-letter circuit breaker and the intake window (in-order acks, abandon, bounds)."""

from __future__ import annotations

import asyncio
import gc
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import cast

import pytest

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import BreakerOpen, PermanentError, Reason
from fileserver.pipeline import Outcome, Result
from fileserver.processor import DeadLetterLimit, Health, Processor
from fileserver.record import SourceRecord
from fileserver.repository import Repository
from fileserver.retry import RetryPolicy
from fileserver.worker import YOUNG_THRESHOLD, IntakeWindow, freeze_heap
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
    assert b.allow("source_not_found") is False, "an open breaker holds every reason..."
    for reason in ("invalid_event", "malformed_json", "internal_error"):
        assert b.allow(reason), "...that a retry can fix: payload reasons are never held"
    assert "3 consecutive 'invalid_audio'" in b.describe()
    b.success()
    assert not b.open and b.allow("invalid_audio")


def test_breaker_counts_only_consecutive_failures_of_one_reason() -> None:
    b = DeadLetterLimit(max_consecutive=3)
    for reason in ["a", "a", "b", "b", "a", "a"]:
        assert b.allow(reason)
    b.success()
    assert all(b.allow("a") for _ in range(3))


def test_payload_reasons_neither_count_nor_reset_the_breaker() -> None:
    b = DeadLetterLimit(max_consecutive=3)
    for _ in range(1000):  # a bad producer deploy: 1,000 invalid events in a row
        assert b.allow("invalid_event") and b.allow("malformed_json")
    assert not b.open
    assert b.allow("source_not_found") and b.allow("source_not_found")
    assert b.allow("invalid_event"), "a payload failure between them..."
    assert b.allow("source_not_found")
    assert b.open, "...does not break the run of source failures"


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
    assert clock.health_at_sleep == [True], "holding is not an outage: intake goes on"
    assert processor.health.ok and not processor.breaker.open


async def test_backfill_mode_stops_instead_of_holding(clock: Clock) -> None:
    bad = PermanentError(Reason.SOURCE_NOT_FOUND, "404")
    processor = Processor(
        ScriptedIngest([bad]),
        cast(Repository, FakeRepo()),
        cast(DeadLetterSink, FakeSink()),
        source_retry_s=60,
        breaker=DeadLetterLimit(max_consecutive=1, cooldown_s=30),
        hold=False,
        sleep=clock.sleep,
    )
    assert (await processor.process(SourceRecord("t", 0, 0, b"{}"))).reason == "source_not_found"
    with pytest.raises(BreakerOpen) as caught:
        await processor.process(RECORD)
    assert caught.value.reason == "source_not_found"
    assert "FILESERVER_DLQ_MAX_CONSECUTIVE=1" in caught.value.detail
    assert clock.sleeps == [], "it never waited"


async def test_a_held_event_gives_its_slot_back(clock: Clock) -> None:
    """One slot, one held event: a good event still runs and closes the breaker."""
    bad = PermanentError(Reason.SOURCE_NOT_FOUND, "404")
    good = SourceRecord("t", 0, 7, b"{}")
    gate = asyncio.Event()

    async def ingest(record: SourceRecord) -> Result:
        if record.offset == 7:
            return Result(Outcome.INGESTED, record)
        if gate.is_set():
            return Result(Outcome.INGESTED, record)
        raise bad

    async def sleep(delay: float) -> None:
        await gate.wait()  # the cooldown lasts until the good event has run

    processor = Processor(
        ingest,
        cast(Repository, FakeRepo()),
        cast(DeadLetterSink, FakeSink()),
        source_retry_s=60,
        breaker=DeadLetterLimit(max_consecutive=1, cooldown_s=30),
        sleep=sleep,
    )
    slot = asyncio.Semaphore(1)
    await processor.process(SourceRecord("t", 0, 0, b"{}"), slot)  # opens the breaker
    held = asyncio.create_task(processor.process(RECORD, slot))
    await _settle()
    assert not held.done()
    result = await asyncio.wait_for(processor.process(good, slot), 5)
    assert result.outcome is Outcome.INGESTED and not processor.breaker.open
    gate.set()
    assert (await asyncio.wait_for(held, 5)).outcome is Outcome.INGESTED


class FakeProcessor:
    """Finishes each record when the test releases it."""

    def __init__(self) -> None:
        self.health = Health()
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []

    async def process(
        self, record: SourceRecord, slot: AbstractAsyncContextManager[object] | None = None
    ) -> Result:
        async with slot or nullcontext():
            await self.health.wait_ok()
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


# --- fencing: nothing of an ended generation reaches the ack path -------------------------


def _window(fake: FakeProcessor, acked: list[int], forgotten: list[int], **kw: int) -> IntakeWindow:
    return IntakeWindow(
        cast(Processor, fake),
        acked.append,
        forget=forgotten.append,
        concurrency=kw.get("concurrency", 8),
        max_pending=kw.get("max_pending", 100),
    )


async def test_a_submit_waiting_for_room_is_fenced_by_the_drain() -> None:
    """The loss of the issue: the window is full, one more event E waits for room, a
    rebalance drains and abandons the stuck ones; E must not run and ack afterwards."""
    fake = FakeProcessor()
    acked: list[int] = []
    forgotten: list[int] = []
    window = _window(fake, acked, forgotten, concurrency=2, max_pending=2)
    for offset in (0, 1):  # stuck behind a gateway that is down
        assert await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    waiting = asyncio.create_task(window.submit("p0", SourceRecord("t", 0, 2, b""), 2))
    await _settle()
    assert not waiting.done()
    assert await window.drain(grace_s=0.05) == 2
    assert await asyncio.wait_for(waiting, 1) is False, "E is fenced, not admitted"
    fake.release(2)
    await _settle()
    assert 2 not in fake.started and acked == []
    assert sorted(forgotten) == [0, 1, 2] and window.fenced == 1
    # the next generation (the partition came back) starts over from the committed offset
    for offset in (0, 1, 2):
        fake.release(offset)
        assert await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    await _settle()
    assert acked == [0, 1, 2]


async def test_a_drain_admits_nothing_that_arrives_while_it_runs() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    forgotten: list[int] = []
    window = _window(fake, acked, forgotten)
    assert await window.submit("p0", SourceRecord("t", 0, 0, b""), 0)
    drain = asyncio.create_task(window.drain(grace_s=30))
    await _settle()
    late = SourceRecord("t", 0, 1, b"")
    assert await asyncio.wait_for(window.submit("p0", late, 1), 1) is False
    assert fake.started == [0] and forgotten == [1]
    fake.release(0)  # the in-flight one finishes within the grace: still acked
    assert await asyncio.wait_for(drain, 5) == 0
    assert acked == [0]


async def test_events_finishing_within_the_grace_ack_in_order_then_the_rest_is_forgotten() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    forgotten: list[int] = []
    window = _window(fake, acked, forgotten)
    for offset in range(4):
        await window.submit("p0", SourceRecord("t", 0, offset, b""), offset)
    await _settle()
    drain = asyncio.create_task(window.drain(grace_s=0.2))
    for offset in (0, 1, 3):
        fake.release(offset)
    assert await asyncio.wait_for(drain, 5) == 2
    assert acked == [0, 1], "3 finished too, but after the stuck 2: never acked"
    assert sorted(forgotten) == [2, 3]


async def test_a_stale_event_that_finishes_after_the_fence_never_acks() -> None:
    """An event that ignores its cancellation for a moment (a thread finishing) must not
    ack once its generation has ended."""
    acked: list[int] = []
    forgotten: list[int] = []
    finish = asyncio.Event()

    class Stubborn(FakeProcessor):
        async def process(
            self, record: SourceRecord, slot: AbstractAsyncContextManager[object] | None = None
        ) -> Result:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await finish.wait()  # e.g. a to_thread call that has to return first
            return Result(Outcome.INGESTED, record)

    window = _window(Stubborn(), acked, forgotten)
    await window.submit("p0", SourceRecord("t", 0, 0, b""), 0)
    await _settle()
    drain = asyncio.create_task(window.drain(grace_s=0.01))
    await asyncio.sleep(0.05)
    finish.set()
    await asyncio.wait_for(drain, 5)
    assert acked == [] and forgotten == [0]


async def test_an_offset_delivered_again_while_in_flight_is_ignored() -> None:
    fake = FakeProcessor()
    acked: list[int] = []
    forgotten: list[str] = []
    window = IntakeWindow(
        cast(Processor, fake), acked.append, forget=forgotten.append, concurrency=8, max_pending=10
    )
    assert await window.submit("p0", SourceRecord("t", 0, 5, b""), 5)
    assert not await window.submit("p0", SourceRecord("t", 0, 5, b""), "again")
    assert forgotten == ["again"]
    fake.release(5)
    await _settle()
    assert acked == [5] and window.pending == 0


def test_freeze_heap_collects_then_hides_what_is_alive_from_the_collector() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    Cycle()  # unreachable: collected, not frozen for ever
    alive = [Cycle()]
    threshold = gc.get_threshold()
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *threshold[1:])
        assert not any(type(o) is Cycle for o in gc.get_objects())  # neither is tracked now
        assert alive[0].me is alive[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert sum(type(o) is Cycle for o in gc.get_objects()) == 1
