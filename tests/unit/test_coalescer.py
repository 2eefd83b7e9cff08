"""Coalescer: batching of concurrent calls (pure asyncio, no database)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

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


def _echo_recording_batches() -> tuple[
    list[list[int]], Callable[[list[int]], Awaitable[list[int]]]
]:
    """A ``run`` that returns its items, and the list of the batches it was given."""
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    return calls, run


async def test_a_lingering_flusher_gathers_items_from_later_loop_steps() -> None:
    calls, run = _echo_recording_batches()
    batcher: Coalescer[int, int] = Coalescer(run, max_items=100, linger_s=0.05)
    first = asyncio.ensure_future(batcher.call(0))
    for _ in range(3):
        await asyncio.sleep(0)  # the flusher is now lingering
    rest = [asyncio.ensure_future(batcher.call(i)) for i in (1, 2)]
    async with asyncio.timeout(5):
        assert await asyncio.gather(first, *rest) == [0, 1, 2]
    assert calls == [[0, 1, 2]]


async def test_each_batch_size_is_reported_before_the_batch_runs() -> None:
    sizes: list[int] = []

    async def run(items: list[int]) -> list[int]:
        sizes.append(-len(items))  # runs after the report
        return items

    batcher: Coalescer[int, int] = Coalescer(run, max_items=2, on_batch=sizes.append)
    assert await asyncio.gather(*(batcher.call(i) for i in range(3))) == [0, 1, 2]
    assert sizes == [2, -2, 1, -1]


async def test_a_full_queue_ends_the_linger_at_once() -> None:
    """An hour's linger: only a full batch can end the wait within the test's timeout."""
    calls, run = _echo_recording_batches()
    batcher: Coalescer[int, int] = Coalescer(run, max_items=2, linger_s=3600)
    futures = []
    for i in range(4):
        futures.append(asyncio.ensure_future(batcher.call(i)))
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        assert await asyncio.gather(*futures) == [0, 1, 2, 3]
    assert calls == [[0, 1], [2, 3]]


@pytest.mark.parametrize("steps", [1, 3], ids=["before-it-starts", "while-it-lingers"])
async def test_cancelling_the_flusher_cancels_the_queued_calls(steps: int) -> None:
    """Nothing may wait for a batch that no flusher will ever run (shutdown)."""
    calls, run = _echo_recording_batches()
    batcher: Coalescer[int, int] = Coalescer(run, max_items=3, linger_s=3600)
    queued = [asyncio.ensure_future(batcher.call(i)) for i in (1, 2)]
    for _ in range(steps):
        await asyncio.sleep(0)
    (flusher,) = [t for t in asyncio.all_tasks() if t.get_name() == "repository batch"]
    flusher.cancel()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*queued, return_exceptions=True)
    assert [type(r) for r in results] == [asyncio.CancelledError] * 2
    assert calls == []
    # the next calls get a flusher of their own (a full batch ends its linger)
    async with asyncio.timeout(5):
        assert await asyncio.gather(*(batcher.call(i) for i in (3, 4, 5))) == [3, 4, 5]
    assert calls == [[3, 4, 5]]
