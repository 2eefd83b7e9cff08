"""The batched repository (``FILESERVER_DB_BATCH_ROWS``) against a real Postgres:
concurrent inserts and look-ups share statements, each caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from fileserver.migrate import upgrade
from fileserver.repository import Coalescer, Repository
from tests.helpers import count
from tests.integration.test_repository import _row


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[Repository]:
    upgrade(database_url)
    engine = create_async_engine(database_url)
    yield Repository(engine, batch_rows=50)
    await engine.dispose()


async def test_concurrent_inserts_are_batched_and_each_caller_learns_its_outcome(
    repo: Repository, database_url: str
) -> None:
    rows = [_row(f"http://127.0.0.1/{i}.mp3", offset=i) for i in range(120)]
    assert await repo.insert_recording(rows[0])
    # 119 new rows, rows[0] again, and two callers racing with the same new row
    again = [
        *rows[1:],
        rows[0],
        _row("http://127.0.0.1/x.mp3", 500),
        _row("http://127.0.0.1/x.mp3", 501),
    ]
    inserted = await asyncio.gather(*(repo.insert_recording(r) for r in again))
    assert inserted[:119] == [True] * 119
    assert inserted[119] is False
    assert sorted(inserted[120:]) == [False, True]  # exactly one of the racing pair wins
    assert count(database_url, "recordings") == 121
    md5s = await asyncio.gather(
        *(repo.recording_md5(u) for u in ("http://127.0.0.1/5.mp3", "http://127.0.0.1/none.mp3"))
    )
    assert md5s == [rows[5].md5, None]


async def test_a_failed_batch_fails_every_caller_of_it() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0)
        if 13 in items:
            raise RuntimeError("boom")
        return [i * 2 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(run, max_items=10, max_flushes=1)
    results = await asyncio.gather(*(coalescer.call(i) for i in range(30)), return_exceptions=True)
    assert all(len(c) <= 10 for c in calls) and len(calls) < 30  # batched
    failed = [i for i, r in enumerate(results) if isinstance(r, RuntimeError)]
    batch = next(c for c in calls if 13 in c)
    assert failed == batch
    assert all(results[i] == i * 2 for i in range(30) if i not in batch)
