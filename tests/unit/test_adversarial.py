"""Breaks found by an adversarial review, kept as regression tests (in-memory fakes).

The promise: every event ends as exactly one row in ``recordings`` or exactly one row
in ``ingest_failures``; nothing stuck; the worker never stalls for good. Each test
failed on the code before its fix; the real-process versions are in
``tests/e2e/test_adversarial.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import DependencyUnavailable, PermanentError, Reason
from fileserver.events import TalkEvent, parse_event
from fileserver.fetch import Fetcher
from fileserver.pipeline import Ingestor, Outcome, Result
from fileserver.processor import DeadLetterLimit, Processor
from fileserver.record import SourceRecord
from fileserver.repository import Prior, Repository
from fileserver.retry import RetryPolicy
from fileserver.storage import ObjectStore
from fileserver.worker import IntakeWindow
from tests.unit.test_processor import TALK, FakeRepo, FakeSink

FAST = RetryPolicy(initial_s=0.01, max_s=0.05)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_an_outage_retrier_abandoned_by_a_rebalance_does_not_pause_intake_forever() -> None:
    """A dependency outage is in progress when a rebalance (or its grace) abandons the
    only event that was retrying it. The dependency then comes back, and the worker is
    given events again (the partition comes back, or others do): they must run.

    Before ``Health.trying``, health was cleared only by a *successful attempt* and every
    new event first waited in ``health.wait_ok()``: with the retrier cancelled, nothing
    attempted anything again and every later event waited forever.
    """
    dependency_up = False
    attempts: list[int] = []

    async def ingest(record: SourceRecord) -> Result:
        attempts.append(record.offset)
        if not dependency_up:
            raise DependencyUnavailable("postgres", "connection refused")
        return Result(Outcome.INGESTED, record)

    processor = Processor(
        ingest,
        cast(Repository, FakeRepo()),
        cast(DeadLetterSink, FakeSink()),
        source_retry_s=60,
        retry=FAST,
    )
    acked: list[str] = []
    window = IntakeWindow(processor, acked.append, concurrency=4, max_pending=16)

    await window.submit("p0", SourceRecord("events", 0, 0, TALK), "offset 0 (gen 0)")
    assert await _until(lambda: len(attempts) >= 2), "offset 0 retries the outage"
    assert not processor.health.ok, "intake is paused while postgres is down"

    abandoned = await window.drain(grace_s=0.05)  # a rebalance; the outage outlasts the grace
    assert abandoned == 1
    before = len(attempts)

    dependency_up = True  # postgres is back
    # The partition comes back to this worker (or another one is assigned): faust
    # redelivers offset 0 from the committed offset, in the new generation.
    await window.submit("p0", SourceRecord("events", 0, 0, TALK), "offset 0 (gen 1)")
    await window.submit("p0", SourceRecord("events", 0, 1, TALK), "offset 1 (gen 1)")
    done = await _until(lambda: len(acked) == 2, timeout=5.0)
    stuck = window.in_flight
    await window.abandon()
    assert done, (
        f"the worker stalled for good after the outage ended: acked={acked}, "
        f"{stuck} events waiting in health.wait_ok(), health.ok={processor.health.ok}, "
        f"attempts since the rebalance={len(attempts) - before}"
    )


class PriorRepo:
    """The one look-up the pipeline makes before downloading: a failure row at 0/7."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, int, int]] = []

    async def prior_outcome(self, url: str, topic: str, partition: int, offset: int) -> Prior:
        self.asked.append((url, topic, partition, offset))
        return Prior(md5=None, failed=(partition, offset) == (0, 7))


@pytest.mark.parametrize("redrive", [False, True])
async def test_a_redelivered_dead_letter_is_not_ingested_a_second_time(redrive: bool) -> None:
    """An event is dead-lettered (say ``source_unavailable``), its failure row is durable
    but its offset is not committed (SIGKILL, or an earlier event of the partition still
    in flight when a rebalance cut the grace). It is redelivered after the source came
    back: it must still end as exactly one row, so the pipeline stops at its failure row
    (before the fix it downloaded and inserted a recording beside it). ``redrive``
    re-runs such a position on purpose."""
    repo = PriorRepo()
    ingestor = Ingestor(
        cast(Fetcher, None), cast(ObjectStore, None), cast(Repository, repo), max_duration_s=60
    )
    record = SourceRecord("events", 0, 7, TALK, redrive=redrive)
    event = parse_event(TALK)
    assert isinstance(event, TalkEvent)
    done = await ingestor.already_done(record, event)
    assert done is (None if redrive else Outcome.ALREADY_FAILED)
    assert repo.asked == [(event.file_path, "events", 0, 7)], "one look-up, by URL and position"
    other = SourceRecord("events", 0, 8, TALK)
    assert await ingestor.already_done(other, event) is None


async def test_a_held_event_after_a_dependency_blip_does_not_wait_for_health_forever() -> None:
    """No rebalance needed: the dead-letter breaker is open (a gateway answers 404 for
    everything) and a short Postgres blip hits the one event in its attempt (its
    ``already_ingested`` look-up): ``health`` turns degraded, the retry then reaches
    the gateway, gets the 404 and, the breaker being open, the event is *held*. A held
    event loops back to ``health.wait_ok()`` before its next attempt; before
    ``Health.trying`` the only call that cleared ``health`` was a successful attempt,
    which could no longer happen: the event (and every later one) waited forever.
    """
    gateway_fixed = False
    blip = {"b": 1}  # event b's first attempt meets a Postgres blip
    outcomes: dict[str, str] = {}

    async def ingest(record: SourceRecord) -> Result:
        name = record.key.decode() if record.key else "?"
        if blip.get(name):
            blip[name] -= 1
            raise DependencyUnavailable("postgres", "connection reset by peer")
        if not gateway_fixed:
            raise PermanentError(Reason.SOURCE_NOT_FOUND, "HTTP 404 from gateway")
        return Result(Outcome.INGESTED, record)

    processor = Processor(
        ingest,
        cast(Repository, FakeRepo()),
        cast(DeadLetterSink, FakeSink()),
        source_retry_s=60,
        retry=FAST,
        breaker=DeadLetterLimit(max_consecutive=1, cooldown_s=0.05),
    )
    first = await processor.process(SourceRecord("events", 0, 0, TALK, key=b"a"))
    assert first.outcome is Outcome.DEAD_LETTERED and processor.breaker.open

    async def run(offset: int, name: str) -> None:
        result = await processor.process(SourceRecord("events", 0, offset, TALK, key=name.encode()))
        outcomes[name] = result.outcome.value

    task = asyncio.create_task(run(1, "b"))
    await asyncio.sleep(0.3)  # b: blip, retry, 404, held (a few cooldowns)
    gateway_fixed = True  # the operator fixes the gateway
    finished = await _until(lambda: "b" in outcomes, timeout=5.0)
    health_ok = processor.health.ok
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert finished, (
        f"event b is stuck for good: held, then waiting in health.wait_ok() with "
        f"health.ok={health_ok} and nothing left that could clear it"
    )


async def test_a_long_run_of_genuine_404s_does_not_stall_the_worker_for_good() -> None:
    """A range of recordings was purged at the gateway (or the group was reset to an old
    offset the gateway no longer keeps): a run of events answers 404 for good, longer
    than FILESERVER_DLQ_MAX_CONSECUTIVE + FILESERVER_MAX_PENDING (here 3 + 4; 100 + 4096
    by default), followed by healthy events.

    Promise: a poison record becomes a dead letter, never an endless retry; the worker
    never stalls for good. Before FILESERVER_DLQ_BREAKER_MAX_HOLD_S the breaker held
    every 404 after the 3rd for ever: held events filled the window, the agent's
    ``submit`` waited for room that never came, no healthy event was read again and the
    breaker (closed only by a success) stayed open.
    """
    bad = set(range(10))  # offsets 0..9 answer 404 for good; 10.. are healthy

    async def ingest(record: SourceRecord) -> Result:
        if record.offset in bad:
            raise PermanentError(Reason.SOURCE_NOT_FOUND, "404 Not Found")
        return Result(Outcome.INGESTED, record)

    repo, sink = FakeRepo(), FakeSink()
    processor = Processor(
        ingest,
        cast(Repository, repo),
        cast(DeadLetterSink, sink),
        source_retry_s=60,
        retry=FAST,
        breaker=DeadLetterLimit(max_consecutive=3, cooldown_s=0.05, max_hold_s=0.3),
    )
    acked: list[int] = []
    window = IntakeWindow(processor, acked.append, concurrency=2, max_pending=4)

    async def agent() -> None:  # the faust agent's loop: one submit per record, in order
        for offset in range(14):
            await window.submit("p0", SourceRecord("events", 0, offset, TALK), offset)

    reader = asyncio.create_task(agent())
    done = await _until(lambda: len(acked) == 14, timeout=5.0)
    reader.cancel()
    stuck = window.pending
    await window.abandon()
    assert done, (
        f"the worker stalled for good: acked {acked}, {stuck} events held in the window, "
        f"dead letters {len(repo.rows)}, breaker open={processor.breaker.open}; the healthy "
        "offsets 10..13 were never read"
    )
