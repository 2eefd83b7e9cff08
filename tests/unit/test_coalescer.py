"""Coalescer: batching of concurrent calls (pure asyncio, no database)."""

from __future__ import annotations

import asyncio

import pytest

from fileserver.repository import Coalescer


async def test_a_caller_retrying_right_after_its_batch_failed_gets_a_new_batch() -> None:
    """The failed flusher is done but may still be registered when its caller retries:
    the retry must start a batch of its own, not wait behind a finished flusher."""
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("first batch fails")
        return [i * 10 for i in items]

    batcher: Coalescer[int, int] = Coalescer(run, max_flushes=1)
    with pytest.raises(ConnectionError):
        await batcher.call(1)
    async with asyncio.timeout(5):  # in this task, right away (wait_for would add a task)
        assert await batcher.call(2) == 20
    assert calls == [[1], [2]]


async def test_items_queued_while_a_batch_runs_form_the_next_batch() -> None:
    release = asyncio.Event()
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            await release.wait()
        return items

    batcher: Coalescer[int, int] = Coalescer(run, max_flushes=1)
    first = asyncio.ensure_future(batcher.call(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.call(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(first, *rest) == [0, 1, 2, 3]
    assert calls == [[0], [1, 2, 3]]
