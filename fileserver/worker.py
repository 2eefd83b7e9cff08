"""The faust wiring: one agent feeding a bounded window of concurrent ``process`` calls.

faust sees a single actor (``concurrency=1``) reading a ``noack`` stream of raw
bytes; fileserver runs up to ``FILESERVER_CONCURRENCY`` events at once and acks each
event only when it and every earlier event of its partition are durable
(:class:`~fileserver.acks.OrderedAcks`). So faust's commits never pass an undurable
event (faust-streaming #606) and no exception can escape the ``async for`` (which
would ack the event).

Shutdown and rebalance: faust waits for every unacked event before it commits
(``wait_empty``) on SIGTERM and on partition revocation. The window's drain bounds that
wait with ``FILESERVER_SHUTDOWN_GRACE_S`` and ends a generation: events still running
after the grace are cancelled and never acked, and nothing read under the old generation
can ack afterwards, so faust commits exactly the durable prefix and the rest is
redelivered (idempotently) to whoever owns the partition next.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import faust

from fileserver import faust_private
from fileserver.acks import OrderedAcks
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.runtime import faust_broker_credentials, open_runtime, preflight
from fileserver.settings import Settings
from fileserver.web import Observability

log = logging.getLogger(__name__)
MAX_POLL_INTERVAL_S = (2**31 - 1) / 1000


class IntakeWindow:
    """Runs records concurrently (bounded) and acks them in partition-offset order.

    Fencing: every drain (partition revocation, shutdown) ends a *generation*. While a
    drain runs no record is admitted; when it ends, everything of the old generation
    still unfinished is cancelled and forgotten, and a record that was waiting for
    room (or arrives late) under the old generation is released without an ack. So
    nothing of a generation can reach faust's ack/commit path after its drain: faust
    forgets a revoked partition's committed offset, and one late ack of a later
    offset would otherwise commit past the abandoned events.
    """

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
        self._generation = 0
        self._draining = 0  # drains running (shutdown may start one during another)
        self.fenced = 0  # records released without an ack by a fence (for tests, logs)

    @property
    def in_flight(self) -> int:
        """Events started and not finished."""
        return len(self._tasks)

    @property
    def pending(self) -> int:
        """Events read and not yet acked (in flight, or waiting for an earlier one)."""
        return len(self._acks)

    @property
    def generation(self) -> int:
        """The current generation: bumped at the end of every drain."""
        return self._generation

    def _open(self, generation: int) -> bool:
        return not self._draining and generation == self._generation

    async def submit(self, partition: Hashable, record: SourceRecord, token: Any) -> bool:
        """Start processing ``record``; waits while ``max_pending`` events are unacked.

        Returns ``False`` when the record was fenced instead: a drain started or ended
        while it waited. It is then never acked (faust redelivers it to the next owner).
        """
        generation = self._generation
        while self._open(generation) and len(self._acks) >= self._max_pending:
            self._released.clear()
            await self._released.wait()
        if not self._open(generation):
            self.fenced += 1
            self._forget(token)
            log.info("fenced %s: read before a rebalance or shutdown", record.source)
            return False
        try:
            self._acks.add(partition, record.offset, token)
        except ValueError:  # delivered again while its first delivery is in the window
            self._forget(token)
            log.warning("ignored %s: the same offset is already in flight", record.source)
            return False
        task = asyncio.create_task(
            self._run(generation, partition, record), name=f"ingest {record.source}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, generation: int, partition: Hashable, record: SourceRecord) -> None:
        await self._processor.process(record, self._slots)
        # Reached only when the outcome is durable: never on cancellation. An event of
        # an ended generation was forgotten by the drain that ended it: never ack it.
        if generation != self._generation:
            return
        for token in self._acks.done(partition, record.offset):
            self._ack(token)
        self._released.set()

    async def drain(self, grace_s: float) -> int:
        """End the current generation: admit nothing more, wait up to ``grace_s`` for
        the events in flight (they still ack, in order), then abandon the rest.

        Abandoned events are cancelled and never acked: they stay uncommitted and
        are redelivered. Returns how many were abandoned.
        """
        self._draining += 1
        self._released.set()  # wake a submit waiting for room: it is fenced now
        try:
            tasks = set(self._tasks)
            if tasks:
                log.info("draining %d in-flight events (grace %.0fs)", len(tasks), grace_s)
                await asyncio.wait(tasks, timeout=grace_s)
            return await self.abandon()
        finally:
            self._draining -= 1

    async def abandon(self) -> int:
        """End the generation now: cancel every in-flight event and forget every unacked
        one (they will be redelivered)."""
        self._generation += 1
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


class FileserverApp(faust_private.PrivateHooks):
    """faust.App whose wait for in-flight events (shutdown, revocation) is bounded and
    fenced, and whose consumer batches its fetches (:mod:`fileserver.faust_private`)."""

    window: IntakeWindow | None = None


def partitions_text(partitions: Iterable[Any]) -> str:
    """``events[0,2] other[1]``: topic partitions, grouped by topic, in order."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    text = " ".join(
        f"{topic}[{','.join(map(str, sorted(parts)))}]" for topic, parts in sorted(by_topic.items())
    )
    return text or "none"


def _partition_fields(partitions: Iterable[Any]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


def log_rebalances(app: faust.App, instance_id: str | None) -> None:
    """Log every partition assignment and revocation at INFO, through faust's public
    ``on_partitions_assigned`` / ``on_partitions_revoked`` signals.

    Assignment names the group generation (``app.consumer_generation_id``, set by faust
    before it sends the signal): with static membership a restarted worker that got its
    partitions back without a rebalance logs the generation its predecessor had.
    faust sends the revocation signal after the drain (``_consumer_wait_empty``), not
    at shutdown; the first join revokes nothing and is not logged."""

    async def on_assigned(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        (assigned,) = args  # faust sends (app, assigned)
        generation = getattr(app, "consumer_generation_id", None)
        log.info(
            "partitions assigned (generation %s): %s",
            generation,
            partitions_text(assigned),
            extra={
                "fields": {
                    "rebalance": "assigned",
                    "generation": generation,
                    "partitions": _partition_fields(assigned),
                    "group_instance_id": instance_id,
                }
            },
        )

    async def on_revoked(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        (revoked,) = args  # faust sends (app, revoked)
        if not revoked:
            return
        log.info(
            "partitions revoked: %s",
            partitions_text(revoked),
            extra={
                "fields": {
                    "rebalance": "revoked",
                    "partitions": _partition_fields(revoked),
                    "group_instance_id": instance_id,
                }
            },
        )

    app.on_partitions_assigned.connect(on_assigned)
    app.on_partitions_revoked.connect(on_revoked)


#: The collector's first threshold in the running worker (Python's default is 700).
YOUNG_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Move everything alive now (modules, clients, the app: ~180,000 objects that live
    as long as the process) out of the garbage collector's sight, once the runtime is
    built. Every full collection traversed them again: with a backlog at full load
    that was ~0.1 ms of CPU per event (py-spy: the collector at ~19 % of the worker's
    GIL time). Garbage now is collected first, so nothing unreachable is kept for ever.

    Then the youngest generation is collected after :data:`YOUNG_THRESHOLD` more
    allocations than deallocations instead of 700. The pipeline leaves no cyclic
    garbage (a collection at full load found next to none); the collector only walked
    the events in flight, over and over, as they came and went: 600 collections and
    0.06 ms of CPU per event with a backlog of 8,000, 17 and 0.014 ms at 10,000.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


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
        # Intake pauses on purpose (a dependency outage, a full window): faust then stops
        # polling, and past this interval aiokafka would leave the group. Liveness is the
        # heartbeat's job (faust runs it on the consumer thread), so, like Kafka Streams
        # did, set the poll interval to Kafka's maximum (Integer.MAX_VALUE ms, ~24.8 days).
        broker_max_poll_interval=MAX_POLL_INTERVAL_S,
        # Static membership (KIP-345) when set: faust passes it to aiokafka's
        # AIOKafkaConsumer(group_instance_id=...), sent in JoinGroup/SyncGroup/Heartbeat/
        # OffsetCommit. A restarted worker with the same id gets its partitions back
        # without a rebalance (and aiokafka sends no LeaveGroup on shutdown).
        consumer_group_instance_id=settings.group_instance_id,
        stream_buffer_maxsize=max(64, settings.concurrency * 4),
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        producer_acks=-1,
    )
    app.shutdown_grace_s = settings.shutdown_grace_s
    log_rebalances(app, settings.group_instance_id)
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
            freeze_heap()
            window = IntakeWindow(
                runtime.processor,
                lambda event: event.ack(),
                # Abandoned events: no longer wait for them, and record no offset.
                forget=faust_private.forget_event,
                concurrency=settings.concurrency,
                max_pending=settings.max_pending,
            )
            app.window = window
            # Intake pauses on an outage without faust's pause_partitions: every event
            # waits for health in the window, the window fills (FILESERVER_MAX_PENDING) and
            # the agent stops reading. faust's getmany drops records already fetched for a
            # partition paused meanwhile while aiokafka's position has moved past them: they
            # were never delivered, and the commit stopped at the gap for good.
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


# --------------------------------------------------------------------------- command line


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver worker``."""
    worker = sub.add_parser(
        "worker",
        help="run the ingestion worker (the default container command)",
        description="Consume FILESERVER_TOPIC as group FILESERVER_GROUP_ID and ingest every "
        "talk event. Checks the database, bucket and broker first and exits naming the "
        "setting to fix when one is unreachable.",
    )
    worker.add_argument(
        "--shutdown-grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM or partition revocation, how long in-flight events may take to "
        "finish before they are left for redelivery (default FILESERVER_SHUTDOWN_GRACE_S, 30)",
    )
    worker.set_defaults(func=run_command)


async def _preflight(settings: Settings) -> None:
    async with open_runtime(settings) as runtime:
        await preflight(runtime)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the long-lived ingestion worker."""
    cli_log = logging.getLogger("fileserver")
    cli_log.info("settings: %s", settings.redacted())

    stop_requested: list[int] = []

    def stop_before_start(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    # Until faust installs its own handlers, SIGTERM/SIGINT mean "do not start".
    signal.signal(signal.SIGTERM, stop_before_start)
    signal.signal(signal.SIGINT, stop_before_start)
    asyncio.run(_preflight(settings))
    if args.shutdown_grace is not None:
        settings = dataclasses.replace(settings, shutdown_grace_s=args.shutdown_grace)
    app = build_app(settings)

    # override_logging=False: keep fileserver's handler (JSON lines unless a terminal).
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False)
    if not worker.stdout.isatty():
        # faust's start-up spinner writes cursor escapes (ESC[?25h) even when stdout is
        # not a terminal: they would land in front of a JSON log line.
        worker.spinner = None
    if stop_requested:
        cli_log.info("signal %s before the worker started: exiting", stop_requested[0])
        return 0
    worker.execute_from_commandline()
    return 0
