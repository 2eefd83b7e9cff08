"""The faust wiring: one agent feeding a bounded window of concurrent ``process`` calls.

faust sees a single actor (``concurrency=1``) reading a ``noack`` stream of raw
bytes; fileserver runs up to ``FILESERVER_CONCURRENCY`` events at once and acks each
event only when it and every earlier event of its partition are durable
(:class:`~fileserver.acks.OrderedAcks`). So faust's commits never pass an undurable
event (faust-streaming #606) and no exception can escape the ``async for`` (which
would ack the event).

Shutdown and rebalance: faust waits for every unacked event before it commits
(``wait_empty``) on SIGTERM and on partition revocation. :class:`FileserverApp` bounds
that wait with ``FILESERVER_SHUTDOWN_GRACE_S``: events still running after the grace
are cancelled and never acked, so faust commits exactly the durable prefix and the
rest is redelivered (idempotently) to whoever owns the partition next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Hashable
from typing import Any

import faust

from fileserver import faust_transport
from fileserver.acks import OrderedAcks
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.runtime import faust_broker_credentials, open_runtime
from fileserver.settings import Settings
from fileserver.web import Observability

log = logging.getLogger(__name__)


class IntakeWindow:
    """Runs records concurrently (bounded) and acks them in partition-offset order."""

    def __init__(
        self,
        processor: Processor,
        ack: Callable[[Any], object],
        *,
        forget: Callable[[Any], object] = lambda token: None,
        concurrency: int,
        max_pending: int,
    ) -> None:
        self._processor = processor
        self._ack = ack
        self._forget = forget
        self._slots = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending
        self._acks: OrderedAcks[Any] = OrderedAcks()
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Events started and not finished."""
        return len(self._tasks)

    @property
    def pending(self) -> int:
        """Events read and not yet acked (in flight, or waiting for an earlier one)."""
        return len(self._acks)

    async def submit(self, partition: Hashable, record: SourceRecord, token: Any) -> None:
        """Start processing ``record``; waits while ``max_pending`` events are unacked."""
        while len(self._acks) >= self._max_pending:
            self._released.clear()
            await self._released.wait()
        self._acks.add(partition, record.offset, token)
        task = asyncio.create_task(self._run(partition, record), name=f"ingest {record.source}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, partition: Hashable, record: SourceRecord) -> None:
        async with self._slots:
            await self._processor.health.wait_ok()
            await self._processor.process(record)
        # Reached only when the outcome is durable: never on cancellation.
        for token in self._acks.done(partition, record.offset):
            self._ack(token)
        self._released.set()

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for in-flight events, then abandon the rest.

        Abandoned events are cancelled and never acked: they stay uncommitted and
        are redelivered. Returns how many were abandoned.
        """
        tasks = set(self._tasks)
        if tasks:
            log.info("draining %d in-flight events (grace %.0fs)", len(tasks), grace_s)
            _done, tasks = await asyncio.wait(tasks, timeout=grace_s)
        return await self.abandon() if tasks else 0

    async def abandon(self) -> int:
        """Cancel every in-flight event and forget every unacked one (they will be redelivered)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dropped = self._acks.clear()
        for token in dropped:
            self._forget(token)
        self._released.set()
        if dropped:
            log.warning("%d events left uncommitted; they will be redelivered", len(dropped))
        return len(dropped)


class FileserverApp(faust.App):
    """faust.App whose wait for in-flight events (shutdown, revocation) is bounded, and
    whose consumer batches its fetches (:mod:`fileserver.faust_transport`)."""

    window: IntakeWindow | None = None
    shutdown_grace_s: float = 30.0
    fetch_batching: tuple[int, int] | None = None  # (fetch_min_bytes, fetch_max_wait_ms)

    def _new_transport(self) -> Any:
        return faust_transport.Transport(self.conf.broker_consumer, self)

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        window = self.window
        if window is None:
            await super()._consumer_wait_empty(consumer, logger)
            return

        async def bound() -> None:
            await asyncio.sleep(0)
            await window.drain(self.shutdown_grace_s)

        timer = asyncio.create_task(bound(), name="bounded drain")
        try:
            await super()._consumer_wait_empty(consumer, logger)
        finally:
            if not timer.done():
                timer.cancel()


def _forget_event(event: Any) -> None:
    """Let faust stop waiting for an event without acking (committing) it."""
    event.message.acked = True


def _pause_on_outage(app: faust.App) -> Callable[[bool], None]:
    """Pause fetching while a dependency is down (the fetcher keeps polling, so the
    group membership stays alive), resume when it is back."""

    def listener(ok: bool) -> None:
        consumer = app.consumer
        assignment = consumer.assignment()
        if not assignment:
            return
        if ok:
            consumer.resume_partitions(assignment)
        else:
            consumer.pause_partitions(assignment)

    return listener


def build_app(settings: Settings) -> FileserverApp:
    """The faust app: one topic of raw bytes, one agent, commits driven by in-order acks."""
    app = FileserverApp(
        settings.group_id,
        broker=[f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",")],
        broker_credentials=faust_broker_credentials(settings),  # Kafka SASL / TLS
        store="memory://",
        # faust keeps nothing fileserver needs on disk; keep its data dir out of the cwd.
        datadir=os.path.join(settings.tmp_dir or tempfile.gettempdir(), "fileserver-faust"),
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
    app.shutdown_grace_s = settings.shutdown_grace_s
    app.fetch_batching = (settings.kafka_fetch_min_bytes, settings.kafka_fetch_max_wait_ms)
    # /metrics, /healthz, /readyz: bound now (a busy port stops the start), served with the app.
    observability = Observability.bind(settings)
    app.add_dependency(observability.service())
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
                # Abandoned events: no longer wait for them, and record no offset.
                forget=_forget_event,
                concurrency=settings.concurrency,
                max_pending=settings.max_pending,
            )
            app.window = window
            runtime.health.add_listener(_pause_on_outage(app))
            observability.attach(runtime, window, app.consumer)
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
                app.window = None
                await window.drain(settings.shutdown_grace_s)
                observability.detach()

    return app
