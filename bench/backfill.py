"""Benchmark: replaying events that are already ingested with ``fileserver backfill``.

``python -m bench.backfill --events 20000`` starts Apache Kafka (KRaft), SeaweedFS and
Postgres on free loopback ports, publishes N seed-format talk events over a few
partitions, inserts their ``recordings`` rows directly (in bulk), then measures, for
``--runs`` runs each:

* **backfill**: :func:`fileserver.backfill.run_backfill` over the whole topic: every
  event is "already present" (one batched look-up per batch read from Kafka);
* **per-event baseline**: the same group-less reading, but one
  ``Repository.recording_md5`` round trip per event (what ``Ingestor.already_ingested``
  does), with the worker's concurrency.

It prints a table (median events/s of the runs, and the ratio) and writes a JSON file
under ``bench/results/`` (gitignored). Nothing is downloaded: the events' sources point
at a closed port, so a download would show up as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.e2e import BASE_TS, event

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Run:
    """One measured replay."""

    mode: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _event(i: int) -> bytes:
    return event(f"http://127.0.0.1:9/bench/room_1_user_{i}_{BASE_TS + i}.mp3", i)


async def _publish(bootstrap: str, topic: str, n: int, partitions: int) -> list[tuple[int, int]]:
    """Publish N events round-robin; returns each one's (partition, offset)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, _event(i), partition=i % partitions) for i in range(n)
        ]
        metas = [await f for f in futures]
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


def _insert_rows(database_url: str, topic: str, bucket: str, placed: list[tuple[int, int]]) -> None:
    """The rows the worker would have written for every event, in one bulk insert."""
    from sqlalchemy import create_engine, insert

    from fileserver.models import Recording

    rows: list[dict[str, Any]] = []
    for i, (partition, offset) in enumerate(placed):
        ts = BASE_TS + i
        md5 = uuid.uuid5(uuid.NAMESPACE_URL, str(i)).hex
        rows.append(
            {
                "uid": i % 500,
                "grp_id": i % 17,
                "m_type": "ptt",
                "source_url": f"http://127.0.0.1:9/bench/room_1_user_{i}_{ts}.mp3",
                "source_ip": "127.0.0.1",
                "event_time": datetime.fromtimestamp(ts, tz=UTC),
                "md5": md5,
                "size_bytes": 4000,
                "duration_ms": 500,
                "bitrate": 24000,
                "sample_rate": 16000,
                "channels": 1,
                "s3_bucket": bucket,
                "s3_key": f"{i % 17}/{i % 500}/2019/09/27/{ts}-{md5}.mp3",
                "kafka_topic": topic,
                "kafka_partition": partition,
                "kafka_offset": offset,
            }
        )
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            for start in range(0, len(rows), 5000):
                conn.execute(insert(Recording), rows[start : start + 5000])
    finally:
        engine.dispose()


async def _backfill_once(settings: Any, batch_size: int) -> Run:
    from fileserver.backfill import BackfillOptions, Kind, run_backfill

    options = BackfillOptions(progress="none", batch_size=batch_size)
    summary = await run_backfill(settings, options, out=io.StringIO(), err=io.StringIO())
    present = summary.counts[Kind.ALREADY_PRESENT]
    if present != summary.done or summary.exit_code != 0:
        raise RuntimeError(f"unexpected backfill outcome:\n{summary.render()}")
    return Run("backfill", present, summary.elapsed_s)


async def _baseline_once(settings: Any, batch_size: int) -> Run:
    """Group-less reading like backfill, then one ``recording_md5`` round trip per event."""
    from aiokafka import TopicPartition

    from fileserver.events import TalkEvent, parse_event
    from fileserver.repository import Repository
    from fileserver.runtime import make_engine, make_reader

    engine = make_engine(settings)
    repo = Repository(engine)
    consumer = make_reader(settings, client_id="bench-baseline")
    await consumer.start()
    try:
        await consumer._client.add_topic(settings.topic)
        tps = [
            TopicPartition(settings.topic, p)
            for p in sorted(consumer.partitions_for_topic(settings.topic) or ())
        ]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        slots = asyncio.Semaphore(settings.concurrency)
        found = 0

        async def look_up(url: str) -> None:
            nonlocal found
            try:
                if await repo.recording_md5(url) is not None:
                    found += 1
            finally:
                slots.release()

        tasks: set[asyncio.Task[None]] = set()
        done = 0
        started = time.monotonic()
        remaining = dict(end)
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=batch_size)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset >= end[tp]:
                        break
                    parsed = parse_event(m.value)
                    done += 1
                    if isinstance(parsed, TalkEvent):
                        await slots.acquire()
                        task = asyncio.create_task(look_up(parsed.file_path))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    del remaining[tp]
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    finally:
        await consumer.stop()
        await engine.dispose()
    if found != done:
        raise RuntimeError(f"baseline found {found} rows for {done} events")
    return Run("per-event baseline", done, elapsed)


def _table(results: dict[str, list[Run]], events: int) -> str:
    lines = [
        f"replay of {events:,} already-ingested events (median of {len(results['backfill'])} runs)",
        f"{'mode':<22}{'events/s':>12}{'seconds':>10}   runs (events/s)",
    ]
    medians: dict[str, float] = {}
    for mode, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        medians[mode] = rate
        seconds = statistics.median(r.seconds for r in runs)
        each = ", ".join(f"{r.rate:,.0f}" for r in runs)
        lines.append(f"{mode:<22}{rate:>12,.0f}{seconds:>10.2f}   {each}")
    ratio = medians["backfill"] / medians["per-event baseline"]
    lines.append(f"{'ratio':<22}{ratio:>11.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=20000, help="events (default 20000)")
    parser.add_argument("--partitions", type=int, default=3, help="partitions (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--batch", type=int, default=2000, help="records per batch read")
    parser.add_argument("--workdir", type=Path, help="server data (default: a temp dir)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fileserver.devstack.servers import start_postgres, start_seaweedfs
    from fileserver.devstack.stack import StackConfig, prepare
    from tests.servers.kafka import start_kafka

    with ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        else:
            workdir = args.workdir
        print("starting Apache Kafka, SeaweedFS and Postgres ...", file=sys.stderr)
        kafka = stack.enter_context(start_kafka(workdir / "kafka"))
        s3 = stack.enter_context(start_seaweedfs(workdir / "seaweedfs"))
        pg = stack.enter_context(start_postgres(workdir / "postgres"))
        name = uuid.uuid4().hex[:8]
        config = StackConfig(
            kafka_bootstrap=kafka.bootstrap,
            s3_endpoint_url=s3.endpoint_url,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            s3_region=s3.region,
            database_url=pg.create_database(f"bench_{name}"),
            topic=f"bench-{name}",
            dlq_topic=f"bench-dlq-{name}",
            group_id=f"bench-{name}",
            bucket=f"bench-{name}",
            extra={"FILESERVER_LOG_LEVEL": "WARNING"},
        )
        prepare(config, partitions=args.partitions)
        for key, value in config.env().items():
            if key.startswith("AWS_"):
                os.environ[key] = value
        print(f"publishing {args.events:,} events and inserting their rows ...", file=sys.stderr)
        placed = asyncio.run(
            _publish(config.kafka_bootstrap, config.topic, args.events, args.partitions)
        )
        _insert_rows(config.database_url, config.topic, config.bucket, placed)
        settings = config.settings()

        results: dict[str, list[Run]] = {"backfill": [], "per-event baseline": []}
        for i in range(args.runs):
            for mode, measure in (
                ("backfill", _backfill_once),
                ("per-event baseline", _baseline_once),
            ):
                run = asyncio.run(measure(settings, args.batch))
                results[mode].append(run)
                print(
                    f"run {i + 1}/{args.runs} {mode}: {run.events:,} events in "
                    f"{run.seconds:.2f}s = {run.rate:,.0f}/s",
                    file=sys.stderr,
                )
        table = _table(results, args.events)
        print(table)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"backfill-{stamp}.json"
        out.write_text(
            json.dumps(
                {
                    "benchmark": "backfill replay of already-ingested events",
                    "events": args.events,
                    "partitions": args.partitions,
                    "batch": args.batch,
                    "cpus": os.cpu_count(),
                    "median_events_per_s": {
                        mode: statistics.median(r.rate for r in runs)
                        for mode, runs in results.items()
                    },
                    "runs": {
                        mode: [asdict(r) | {"rate": r.rate} for r in runs]
                        for mode, runs in results.items()
                    },
                },
                indent=2,
            )
        )
        print(f"results written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
