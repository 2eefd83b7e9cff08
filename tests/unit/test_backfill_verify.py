"""``backfill --verify`` on an already-ingested event, with in-memory fakes and a fake
clock: it runs under the processor's retry policy (the one source budget, outages
waited out by the one dependency loop) and a bug is reported at once, not retried."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

from fileserver.backfill import Backfill, BackfillOptions, Kind, PartitionRange, Plan, Tally
from fileserver.deadletter import DeadLetterSink
from fileserver.errors import DependencyUnavailable, PermanentError, Reason, SourceUnavailable
from fileserver.events import TalkEvent, object_key, parse_event
from fileserver.pipeline import Result
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repository import Repository, StoredRow
from fileserver.retry import RetryPolicy
from fileserver.runtime import Runtime
from fileserver.settings import Settings
from fileserver.storage import StoredObject
from tests.unit.test_backfill_breaker import TOPIC, _Consumer, _Repo, _Sink
from tests.unit.test_processor import Clock

URL = "http://src/a.mp3"
MD5 = "0123456789abcdef0123456789abcdef"
VALUE = json.dumps(
    {
        "msg_type": 1,
        "ptt_msg": {"uid": "1", "grp_id": "2", "timestamp": "1569569697", "file_path": URL},
    }
).encode()
EVENT = parse_event(VALUE)
assert isinstance(EVENT, TalkEvent)
KEY = object_key(EVENT, MD5)


class _Rows(_Repo):
    """The event already has its row; the first ``outages`` look-ups of it fail."""

    def __init__(self, outages: int = 0) -> None:
        super().__init__()
        self.outages = outages

    async def existing_source_urls(self, urls: list[str]) -> set[str]:
        return set(urls)

    async def recording_row(self, source_url: str) -> StoredRow | None:
        if self.outages:
            self.outages -= 1
            raise DependencyUnavailable("postgres", "connection refused")
        return StoredRow(MD5, 100, "bucket", KEY)


class _Store:
    bucket = "bucket"

    def __init__(self, stored: StoredObject | None) -> None:
        self.stored = stored

    async def head(self, key: str) -> StoredObject | None:
        return self.stored


class _Source:
    """Every download fails with ``error``, or serves the row's bytes."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.calls = 0

    @contextlib.asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        yield SimpleNamespace(md5=MD5, size=100, url=url)


async def _verify(
    clock: Clock, source: _Source, stored: StoredObject | None, outages: int = 0
) -> tuple[Tally, Processor]:
    repo, sink = _Rows(outages), _Sink()

    async def ingest(record: SourceRecord) -> Result:
        raise AssertionError("verify ingests nothing that has a row")

    processor = Processor(
        ingest,
        cast(Repository, repo),
        cast(DeadLetterSink, sink),
        source_retry_s=10,
        retry=RetryPolicy(initial_s=1.0, max_s=4.0),
        hold=False,
        sleep=clock.sleep,
    )
    clock.health = processor.health
    runtime = cast(
        Runtime,
        SimpleNamespace(
            settings=Settings(source_retry_s=999),  # the processor's budget is the one used
            repo=repo,
            store=_Store(stored),
            fetcher=source,
            dead_letters=sink,
            health=processor.health,
            processor=processor,
        ),
    )
    tally = Tally()
    plan = Plan(TOPIC, (PartitionRange(0, 0, 1),))
    backfill = Backfill(runtime, plan, BackfillOptions(verify=True), tally, concurrency=1)
    await asyncio.wait_for(backfill.run(cast(Any, _Consumer([VALUE]))), timeout=10)
    return tally, processor


MATCHING = StoredObject(KEY, 100, {"md5": MD5})


async def test_a_source_down_for_the_whole_budget_falls_back_to_the_stored_object(
    clock: Clock,
) -> None:
    source = _Source(SourceUnavailable("HTTP 503"))
    start = clock.now
    tally, processor = await _verify(clock, source, MATCHING)
    assert tally.counts == Counter({Kind.ALREADY_PRESENT: 1}), tally.problems
    assert source.calls > 1, "the source was retried"
    assert clock.now - start >= 10, "for the processor's FILESERVER_SOURCE_RETRY_S"
    assert clock.now - start - clock.sleeps[-1] < 10, "and not longer"
    assert processor.health.ok and all(clock.health_at_sleep), "a source pauses nothing"


async def test_a_source_gone_for_good_and_no_object_is_a_problem(clock: Clock) -> None:
    source = _Source(PermanentError(Reason.SOURCE_NOT_FOUND, "HTTP 404"))
    tally, _ = await _verify(clock, source, None)
    assert tally.counts == Counter({Kind.PROBLEM: 1})
    (problem,) = tally.problems
    assert "object missing or different and the source failed" in problem
    assert "source_not_found: HTTP 404" in problem
    assert source.calls == 1 and clock.sleeps == []


async def test_a_database_outage_is_waited_out_with_intake_paused(clock: Clock) -> None:
    source = _Source(None)
    tally, processor = await _verify(clock, source, MATCHING, outages=3)
    assert tally.counts == Counter({Kind.ALREADY_PRESENT: 1}), tally.problems
    assert clock.health_at_sleep == [False] * 3, "paused while postgres was down"
    assert processor.health.ok, "and resumed once it answered"
    assert source.calls == 1


async def test_a_bug_is_reported_at_once_not_retried(clock: Clock) -> None:
    source = _Source(KeyError("a bug"))
    tally, processor = await _verify(clock, source, MATCHING)
    assert tally.counts == Counter({Kind.ERROR: 1})
    assert source.calls == 1 and clock.sleeps == []
    assert processor.health.ok
