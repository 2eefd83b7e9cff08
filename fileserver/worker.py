"""The faust wiring: one agent feeding a bounded window of concurrent ``process`` calls.

faust sees a single actor (``concurrency=1``) reading a ``noack`` stream of raw
bytes; fileserver runs up to ``FILESERVER_CONCURRENCY`` events at once and acks each
event only when it and every earlier event of its partition are durable
(:class:`~fileserver.acks.OrderedAcks`). So faust's commits never pass an undurable
event (faust-streaming #606) and no exception can escape the ``async for`` (which
would ack the event).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any

import faust

from fileserver.acks import OrderedAcks
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.runtime import open_runtime
from fileserver.settings import Settings

log = logging.getLogger(__name__)


class IntakeWindow:
    """Runs records concurrently (bounded) and acks them in partition-offset order."""

    def __init__(
        self,
        processor: Processor,
        ack: Callable[[Any], object],
        *,
        concurrency: int,
        max_pending: int,
    ) -> None:
        self._processor = processor
        self._ack = ack
        self._slots = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending
        self._acks: OrderedAcks[Any] = OrderedAcks()
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def pending(self) -> int:
        return len(self._acks)

    async def submit(self, partition: Hashable, record: SourceRecord, token: Any) -> None:
        """Start processing ``record``; waits while the window is full or intake is paused."""
        await self._processor.health.wait_ok()
        while len(self._acks) >= self._max_pending:
            self._released.clear()
            await self._released.wait()
        await self._slots.acquire()
        self._acks.add(partition, record.offset, token)
        task = asyncio.create_task(self._run(partition, record), name=f"ingest {record.source}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, partition: Hashable, record: SourceRecord) -> None:
        try:
            await self._processor.process(record)
        finally:
            self._slots.release()
        # Reached only when the outcome is durable: never on cancellation.
        for token in self._acks.done(partition, record.offset):
            self._ack(token)
        self._released.set()

    async def close(self, grace_s: float) -> None:
        """Let in-flight events finish for up to ``grace_s``; cancel (and never ack) the rest."""
        if self._tasks:
            log.info("draining %d in-flight events (grace %.0fs)", len(self._tasks), grace_s)
            _done, still = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in still:
                task.cancel()
            if still:
                log.warning(
                    "%d events not finished within grace; they will be redelivered", len(still)
                )
                await asyncio.gather(*still, return_exceptions=True)


def build_app(settings: Settings, *, shutdown_grace_s: float = 30.0) -> faust.App:
    """The faust app: one topic of raw bytes, one agent, commits driven by in-order acks."""
    app = faust.App(
        settings.group_id,
        broker=[f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",")],
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 10),
        broker_request_timeout=max(settings.session_timeout_s + 5, 40.0),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_max_poll_records=500,
        stream_buffer_maxsize=max(64, settings.concurrency * 4),
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        producer_acks=-1,
    )
    topic = app.topic(
        settings.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    @app.agent(topic, name="fileserver.ingest", concurrency=1)
    async def ingest(stream: Any) -> None:
        async with open_runtime(settings) as runtime:
            window = IntakeWindow(
                runtime.processor,
                lambda event: event.ack(),
                concurrency=settings.concurrency,
                max_pending=settings.max_pending,
            )
            try:
                async for event in stream.noack().events():
                    msg = event.message
                    record = SourceRecord(
                        topic=msg.topic,
                        partition=msg.partition,
                        offset=msg.offset,
                        value=msg.value,
                        key=msg.key,
                        timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                    )
                    await window.submit(msg.tp, record, event)
            finally:
                await window.close(shutdown_grace_s)

    return app
