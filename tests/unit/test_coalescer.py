"""Coalescer: batching of concurrent calls (pure asyncio, no database)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fileserver.db.coalescer import Coalescer


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


def _isolating_run(
    bad: set[int], outage_at: int | None = None
) -> tuple[list[list[int]], Callable[[list[int]], Awaitable[list[int]]]]:
    """A ``run`` that fails with ValueError when a batch holds a ``bad`` item, and with
    ConnectionError when it runs ``outage_at``."""
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0)
        if outage_at in items and len(items) == 1:
            raise ConnectionError("outage")
        if bad & set(items):
            raise ValueError(f"bad item in {items}")
        return [i * 10 for i in items]

    return calls, run


def _is_value_error(exc: Exception) -> bool:
    return isinstance(exc, ValueError)


async def test_an_item_error_reruns_the_batch_one_item_at_a_time() -> None:
    calls, run = _isolating_run(bad={3, 7})
    batcher: Coalescer[int, int] = Coalescer(run, max_items=10, isolate=_is_value_error)
    results = await asyncio.gather(*(batcher.call(i) for i in range(10)), return_exceptions=True)
    assert [type(r) for r in results if isinstance(r, BaseException)] == [ValueError] * 2
    assert [i for i, r in enumerate(results) if isinstance(r, ValueError)] == [3, 7]
    assert [r for r in results if not isinstance(r, BaseException)] == [
        i * 10 for i in range(10) if i not in (3, 7)
    ]
    assert calls == [list(range(10)), *([i] for i in range(10))]


async def test_an_error_that_is_not_an_items_fails_the_whole_batch_without_reruns() -> None:
    calls, run = _isolating_run(bad={3})
    batcher: Coalescer[int, int] = Coalescer(
        run, max_items=10, isolate=lambda exc: isinstance(exc, KeyError)
    )
    results = await asyncio.gather(*(batcher.call(i) for i in range(5)), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 5
    assert calls == [[0, 1, 2, 3, 4]]


async def test_an_outage_during_the_reruns_fails_the_items_not_yet_run_at_once() -> None:
    """Items already answered keep their answer; the rest get the outage without being
    tried (each would wait for the same dead database)."""
    calls, run = _isolating_run(bad={1}, outage_at=3)
    batcher: Coalescer[int, int] = Coalescer(run, max_items=10, isolate=_is_value_error)
    results = await asyncio.gather(*(batcher.call(i) for i in range(6)), return_exceptions=True)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError)
    assert [type(r) for r in results[3:]] == [ConnectionError] * 3
    assert calls == [[0, 1, 2, 3, 4, 5], [0], [1], [2], [3]]


async def test_a_caller_that_gave_up_is_not_rerun() -> None:
    calls, run = _isolating_run(bad={2})
    batcher: Coalescer[int, int] = Coalescer(run, max_items=10, isolate=_is_value_error)
    futures = [asyncio.ensure_future(batcher.call(i)) for i in range(4)]
    await asyncio.sleep(0)  # all queued, the flusher started
    futures[0].cancel()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1] == 10 and isinstance(results[2], ValueError) and results[3] == 30
    assert [0] not in calls
