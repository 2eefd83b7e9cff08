"""Breaks found by the second adversarial review, kept as regression tests against a real
Postgres and a real Kafka; each failed on the code before its fix."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fileserver.deadletter import DeadLetterSink
from fileserver.migrate import upgrade
from fileserver.pipeline import Outcome, Result
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repository import Repository
from tests.helpers import query
from tests.integration.test_repository import _row
from tests.unit.test_processor import TALK


class Sink:
    def __init__(self) -> None:
        self.letters: list[tuple[str, str]] = []

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        self.letters.append((reason, detail))


def _read_only(database_url: str, on: bool) -> None:
    engine = create_engine(database_url, poolclass=NullPool)
    dbname = engine.url.database
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SET default_transaction_read_only = off"))
        conn.execute(
            text(
                f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = '
                + ("on" if on else "off")
            )
        )
    engine.dispose()


async def test_a_read_only_postgres_failover_does_not_dead_letter_healthy_events(
    database_url: str,
) -> None:
    """A Postgres failover (the old primary comes back read-only, or a replica is
    promoted a few seconds late) answers every INSERT with ``cannot execute INSERT in a
    read-only transaction`` for ~6 s. That is a dependency outage: the event must wait
    and end as its recordings row. Before SQLSTATE 25006 (and the other server-state
    codes) counted as an outage, the processor took it for a *bug* (InternalError is not
    Operational/Interface), retried it 5 times in ~3 s and dead-lettered a healthy event
    as ``internal_error``."""
    upgrade(database_url)
    engine = create_async_engine(database_url, poolclass=NullPool)
    repo = Repository(engine)
    record = SourceRecord("events", 0, 0, TALK)

    async def ingest(rec: SourceRecord) -> Result:
        # the pipeline's last step (insert the row); download/probe/upload succeeded
        inserted = await repo.insert_recording(_row("http://127.0.0.1/ro.mp3", rec.offset))
        return Result(Outcome.INGESTED if inserted else Outcome.DUPLICATE, rec)

    sink = Sink()
    processor = Processor(
        ingest, repo, cast(DeadLetterSink, sink), source_retry_s=60, internal_error_attempts=5
    )
    _read_only(database_url, True)
    try:
        task = asyncio.create_task(processor.process(record))
        started = time.monotonic()
        await asyncio.sleep(6)  # the failover window
    finally:
        await asyncio.to_thread(_read_only, database_url, False)
    result = await asyncio.wait_for(task, 60)
    await engine.dispose()
    failures = query(database_url, "SELECT reason, left(detail, 160) FROM ingest_failures")
    rows = query(database_url, "SELECT kafka_offset FROM recordings")
    assert result.outcome is not Outcome.DEAD_LETTERED and rows == [(0,)] and not failures, (
        f"a healthy event was dead-lettered by a {time.monotonic() - started:.0f} s read-only "
        f"Postgres: outcome={result.outcome.value}, failures={failures}, "
        f"dead-letter topic={sink.letters}, recordings={rows}"
    )


async def test_a_keyless_poison_record_does_not_stall_the_worker_on_a_compacted_dlq(
    kafka: object,
) -> None:
    """The dead-letter topic has ``cleanup.policy=compact`` (a common default for
    "keep the latest per key" topics) and the producers of the events topic send no keys.
    The broker refuses every keyless letter, the same way on every retry, as it refuses an
    oversize one; before keyless letters were keyed by their source position this
    refusal became ``DependencyUnavailable`` and was retried for ever (with intake
    paused). Promise: a poison record becomes a dead letter, the worker never stalls."""
    from aiokafka import AIOKafkaProducer

    from fileserver.deadletter import KafkaDeadLetters
    from fileserver.errors import DependencyUnavailable
    from tests.integration.test_deadletter_kafka import bootstrap_of, create_topic

    bootstrap = bootstrap_of(kafka)
    topic = await create_topic(bootstrap, {"cleanup.policy": "compact"})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=30000)
    await producer.start()
    try:
        sink = KafkaDeadLetters(producer, topic, deadline_s=15)
        record = SourceRecord("events", 0, 5, b"not json", key=None)
        errors = []
        for _ in range(2):  # what the processor's dead-letter loop does, for ever
            try:
                await sink.publish(record, "malformed_json", "value is not JSON")
                break
            except DependencyUnavailable as exc:
                errors.append(str(exc))
        assert not errors, (
            f"a keyless dead letter is refused by a compacted dead-letter topic on every "
            f"retry, reported as an outage (the worker retries it for ever): {errors}"
        )
    finally:
        await producer.stop()
