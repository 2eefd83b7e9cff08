"""``backfill --verify`` judges a stored object by :mod:`fileserver.layout`'s one rule
and repairs it with :func:`fileserver.repair.restore_object`: an object without md5
metadata (and no ETag that is the md5) is not a match, so it is stored again."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fileserver.backfill import Backfill, BackfillOptions, Kind, PartitionRange, Plan, Tally
from fileserver.deadletter import DeadLetterSink
from fileserver.layout import object_metadata
from fileserver.pipeline import Result
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repository import Repository
from fileserver.retry import RetryPolicy
from fileserver.runtime import Runtime
from fileserver.settings import Settings
from fileserver.storage import StoredObject
from tests.unit.test_backfill_breaker import TOPIC, _Consumer, _Sink
from tests.unit.test_backfill_verify import EVENT, KEY, MD5, VALUE, _Rows
from tests.unit.test_processor import Clock


class _Store:
    bucket = "bucket"

    def __init__(self, stored: StoredObject | None) -> None:
        self.stored = stored
        self.puts: list[tuple[str, str, dict[str, str]]] = []

    async def head(self, key: str) -> StoredObject | None:
        return self.stored

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        self.puts.append((key, md5_hex, metadata))


class _Source:
    def __init__(self, md5: str = MD5) -> None:
        self.md5 = md5

    @contextlib.asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Any]:
        yield SimpleNamespace(md5=self.md5, size=100, url=url, content=b"x" * 100)


async def _verify(clock: Clock, store: _Store, source: _Source | None = None) -> Tally:
    repo, sink = _Rows(), _Sink()

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
    runtime = cast(
        Runtime,
        SimpleNamespace(
            settings=Settings(source_retry_s=999),
            repo=repo,
            store=store,
            fetcher=source or _Source(),
            dead_letters=sink,
            health=processor.health,
            processor=processor,
        ),
    )
    tally = Tally()
    plan = Plan(TOPIC, (PartitionRange(0, 0, 1),))
    backfill = Backfill(runtime, plan, BackfillOptions(verify=True), tally, concurrency=1)
    await asyncio.wait_for(backfill.run(cast(Any, _Consumer([VALUE]))), timeout=10)
    return tally


METADATA = object_metadata(uid=EVENT.uid, grp_id=EVENT.grp_id, md5=MD5, timestamp=EVENT.timestamp)


@pytest.mark.parametrize(
    "stored",
    [
        StoredObject(KEY, 100, {"md5": MD5}),
        StoredObject(KEY, 100, {}, etag=MD5),  # a single PUT's ETag is the md5
    ],
)
async def test_an_object_with_evidence_of_its_md5_is_kept(
    clock: Clock, stored: StoredObject
) -> None:
    store = _Store(stored)
    tally = await _verify(clock, store)
    assert tally.counts == Counter({Kind.ALREADY_PRESENT: 1}) and store.puts == []


@pytest.mark.parametrize(
    "stored",
    [
        StoredObject(KEY, 100, {}),  # no md5 metadata: unknown, never a match
        StoredObject(KEY, 100, {"uid": "1"}, etag="not-an-md5-2"),
        StoredObject(KEY, 100, {"md5": "f" * 32}),
        StoredObject(KEY, 99, {"md5": MD5}),
        None,
    ],
)
async def test_any_other_object_is_stored_again(clock: Clock, stored: StoredObject | None) -> None:
    store = _Store(stored)
    tally = await _verify(clock, store)
    assert tally.counts == Counter({Kind.REPAIRED_OBJECT: 1}), tally.problems
    assert store.puts == [(KEY, MD5, METADATA)]
    why = "missing" if stored is None else f"different ({stored.size} bytes)"
    assert tally.repairs == [f"object {KEY} was {why} ({TOPIC}/0/0)"]


async def test_a_source_with_other_bytes_is_a_problem(clock: Clock) -> None:
    store = _Store(None)
    tally = await _verify(clock, store, _Source("e" * 32))
    assert tally.counts == Counter({Kind.PROBLEM: 1}) and store.puts == []
    (problem,) = tally.problems
    assert f"the source now has md5 {'e' * 32} (100 bytes) but the row says {MD5}" in problem
