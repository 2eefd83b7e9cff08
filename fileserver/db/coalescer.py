"""Natural batching of concurrent single-item calls (:class:`Coalescer`), used by
:class:`fileserver.repository.Repository` to turn concurrent inserts and look-ups into
one statement each. No database code: it only groups calls and hands out results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
R = TypeVar("R")


class Coalescer(Generic[K, R]):
    """Groups concurrent single-item calls into batched calls (natural batching).

    :meth:`call` queues its item; while fewer than ``max_flushes`` batches are being
    written, a flusher takes every queued item (up to ``max_items``) and hands them to
    ``run`` in one call, so items that arrive while a batch is in flight form the next
    one. Each caller still awaits its own result, and an exception from ``run`` is
    raised to every caller of that batch (nothing is reported done that is not).

    ``isolate(exc)`` true: ``exc`` may be one item's fault (a value the database
    refuses), so the batch is run again one item at a time and only the items that fail
    on their own get an error; one bad event must not fail the ~100 others batched with
    it. Any other error (an outage, a timeout) fails the whole batch at once: every item
    would fail alike, and a hundred single retries would only multiply the wait. It
    lives here, not in the statements, because only here does each caller have its own
    future to receive its own outcome.

    One flusher by default: at ~500 events/s a second one halved the batch sizes and
    cost ~20% of the worker's throughput in per-statement overhead (``python -m bench``).

    ``linger_s`` > 0: before taking a batch that is not full, the flusher waits up to
    that long for more items (a full queue ends the wait at once). A statement costs
    ~0.3 ms of client CPU whatever its size (``python -m bench.repository_speed``), so
    a few milliseconds of latency buy batches several times larger under load.
    """

    def __init__(
        self,
        run: Callable[[list[K]], Awaitable[Sequence[R]]],
        *,
        max_items: int = 100,
        max_flushes: int = 1,
        linger_s: float = 0.0,
        on_batch: Callable[[int], object] | None = None,
        isolate: Callable[[Exception], bool] | None = None,
    ) -> None:
        """``on_batch`` is told the size of every batch before it runs (metrics; the
        single-item re-runs of a failed batch are not reported again)."""
        self._run = run
        self._on_batch = on_batch
        self._isolate = isolate
        self._max_items = max_items
        self._max_flushes = max_flushes
        self._linger_s = linger_s
        self._full: asyncio.Future[None] | None = None  # set while a flusher lingers
        self._queue: list[tuple[K, asyncio.Future[R]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def call(self, item: K) -> R:
        """Queue ``item``; return its result once its batch has run."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        full = self._full
        if full is not None and len(self._queue) >= self._max_items and not full.done():
            full.set_result(None)
        # A flusher that has finished may still be in the set (its done callback runs
        # later): count only running ones, or a caller that retries right after its
        # batch failed would queue behind no flusher at all.
        if sum(not task.done() for task in self._flushers) < self._max_flushes:
            task = asyncio.create_task(self._flush(), name="repository batch")
            self._flushers.add(task)
            task.add_done_callback(self._flusher_done)
        return await future

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        """A flusher cancelled (shutdown), even before it started, leaves its queue to
        nobody: cancel those calls rather than let them wait forever."""
        self._flushers.discard(task)
        if task.cancelled() and all(t.done() for t in self._flushers):
            queued, self._queue = self._queue, []
            for _item, fut in queued:
                fut.cancel()

    async def _flush(self) -> None:
        while self._queue:
            if self._linger_s > 0 and len(self._queue) < self._max_items:
                await self._linger()
            batch = self._queue[: self._max_items]
            del self._queue[: self._max_items]
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await self._run([item for item, _fut in live])
            except Exception as exc:
                isolate = self._isolate
                if isolate is None or len(live) == 1 or not isolate(exc):
                    _fail(live, exc)
                    continue
                log.warning(
                    "a batch of %s failed (%s: %s); running its items one at a time",
                    len(live),
                    type(exc).__name__,
                    str(exc).strip().split("\n", 1)[0][:200],
                )
                await self._one_at_a_time(live, isolate)
                continue
            except BaseException as exc:
                _fail(live, exc)
                raise
            for (_item, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _one_at_a_time(
        self, live: list[tuple[K, asyncio.Future[R]]], isolate: Callable[[Exception], bool]
    ) -> None:
        """Run each item of a failed batch alone; the first error that is not an item's
        own (an outage) fails the items not yet run with it, without trying them."""
        for index, (item, fut) in enumerate(live):
            if fut.done():  # its caller gave up meanwhile
                continue
            try:
                (result,) = await self._run([item])
            except Exception as exc:
                if isolate(exc):
                    fut.set_exception(exc)
                    continue
                _fail(live[index:], exc)
                return
            except BaseException as exc:
                _fail(live[index:], exc)
                raise
            fut.set_result(result)

    async def _linger(self) -> None:
        """Wait ``linger_s``, or less if the queue fills up."""
        loop = asyncio.get_running_loop()
        self._full = full = loop.create_future()
        timer = loop.call_later(self._linger_s, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(calls: Sequence[tuple[object, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _item, fut in calls:
        if not fut.done():
            fut.set_exception(exc)
