"""``fileserver redrive``: re-process dead letters through the same pipeline.

The ``ingest_failures`` table is the list of dead letters (the dead-letter topic is
the stream of first failures; it is not rewritten). For each selected failure the
original record (its payload, topic, partition and offset) goes through
``Processor.attempt``, the worker's own retry policy:

* it now succeeds -> a ``recordings`` row exists and the failure row is deleted;
* it fails permanently again -> the failure row keeps it, with the new reason/detail.

Idempotent: re-running it changes nothing for events that already recovered.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import textwrap
from collections import Counter
from typing import Any, TextIO

from fileserver.cliargs import add_concurrency, parse_time, with_concurrency
from fileserver.errors import PermanentError
from fileserver.events import SkippedEvent, parse_event
from fileserver.pipeline import Result
from fileserver.record import SourceRecord
from fileserver.repository import FailureFilter, FailureRow
from fileserver.runtime import Runtime, open_runtime
from fileserver.settings import Settings

log = logging.getLogger("fileserver.redrive")

RECOVERED = "recovered"
FAILED_AGAIN = "failed_again"


def _record(failure: FailureRow) -> SourceRecord:
    return SourceRecord(
        topic=failure.kafka_topic,
        partition=failure.kafka_partition,
        offset=failure.kafka_offset,
        value=failure.payload,
        redrive=True,
    )


async def predict(runtime: Runtime, failure: FailureRow) -> str:
    """What redriving ``failure`` would do, without downloading or writing anything."""
    try:
        parsed = parse_event(failure.payload)
    except PermanentError as exc:
        return f"fail again: {exc.reason.value} ({exc.detail[:80]})"
    if isinstance(parsed, SkippedEvent):
        return f"clear: msg_type {parsed.msg_type} is skipped, not ingested"
    if await runtime.repo.recording_md5(parsed.file_path) is not None:
        return "clear: a row for this recording already exists"
    return f"re-ingest from {parsed.file_path[:120]}"


async def redrive_one(runtime: Runtime, failure: FailureRow) -> tuple[str, str]:
    """Re-process one dead letter; returns (recovered|failed_again, reason or outcome)."""
    outcome = await runtime.processor.attempt(_record(failure))
    if isinstance(outcome, Result):
        await runtime.repo.delete_failure(failure.id)
        log.info(
            "recovered %s/%s/%s: %s",
            failure.kafka_topic,
            failure.kafka_partition,
            failure.kafka_offset,
            outcome.outcome.value,
        )
        return RECOVERED, outcome.outcome.value
    await runtime.repo.update_failure(failure.id, outcome.reason.value, outcome.detail)
    log.info(
        "failed again %s/%s/%s: %s %s",
        failure.kafka_topic,
        failure.kafka_partition,
        failure.kafka_offset,
        outcome.reason.value,
        outcome.detail,
    )
    return FAILED_AGAIN, outcome.reason.value


async def run_redrive(
    settings: Settings,
    where: FailureFilter,
    *,
    dry_run: bool,
    concurrency: int,
    out: TextIO = sys.stdout,
) -> int:
    """Redrive the dead letters selected by ``where``; exit code 0 when all recovered."""
    async with open_runtime(settings) as runtime:
        failures = await runtime.repo.list_failures(where)
        by_reason = Counter(f.reason for f in failures)
        print(
            f"{len(failures)} dead letters selected"
            + (f": {dict(sorted(by_reason.items()))}" if failures else ""),
            file=out,
        )
        if dry_run:
            for failure in failures:
                action = await predict(runtime, failure)
                print(
                    f"  {failure.kafka_topic}/{failure.kafka_partition}/"
                    f"{failure.kafka_offset} [{failure.reason}] would {action}",
                    file=out,
                )
            print("dry run: nothing was written", file=out)
            return 0
        slots = asyncio.Semaphore(concurrency)
        tally: Counter[tuple[str, str]] = Counter()
        done = 0

        async def one(failure: FailureRow) -> None:
            nonlocal done
            async with slots:
                tally[await redrive_one(runtime, failure)] += 1
            done += 1
            if done % 100 == 0 or done == len(failures):
                print(f"  {done}/{len(failures)} redriven", file=out)

        await asyncio.gather(*(one(f) for f in failures))
        recovered = sum(n for (kind, _), n in tally.items() if kind == RECOVERED)
        print(f"recovered: {recovered}", file=out)
        for (kind, reason), n in sorted(tally.items()):
            if kind == FAILED_AGAIN:
                print(f"failed again: {n} {reason}", file=out)
        return 0 if recovered == len(failures) else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver redrive``."""
    p = sub.add_parser(
        "redrive",
        help="re-process dead letters through the pipeline (fixes after an outage or a bug)",
        description=textwrap.fill(
            "Re-process dead letters (rows of ingest_failures) through the worker's own "
            "pipeline and retry policy. One that now succeeds becomes a recordings row and its "
            "dead letter is removed; one that fails again stays a dead letter with its new reason "
            "and detail. Idempotent; the dead-letter topic is not rewritten. Needs the same "
            "FILESERVER_* settings as the worker.",
            width=88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fileserver redrive --dry-run\n"
        "  fileserver redrive --reason source_unavailable --since 2026-11-27T00:00:00Z\n"
        "  fileserver redrive --reason invalid_audio --partition 3 --limit 100\n\n"
        "exit status: 0 every selected dead letter recovered (or none selected),\n"
        "1 some failed again (they stay dead letters with their new reason),\n"
        "2 configuration error, 3 a dependency unreachable, 130 interrupted.",
    )
    p.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="REASON",
        help="only dead letters with this reason (repeatable)",
    )
    p.add_argument(
        "--topic",
        default=None,
        metavar="TOPIC",
        help="only dead letters read from this topic (default: any)",
    )
    p.add_argument(
        "--partition",
        action="append",
        type=int,
        default=[],
        metavar="P",
        help="only dead letters from this source partition (repeatable)",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="ISO-8601",
        help="only dead letters that failed at or after this time (naive = UTC)",
    )
    p.add_argument(
        "--until",
        default=None,
        metavar="ISO-8601",
        help="only dead letters that failed before this time (naive = UTC)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N dead letters")
    add_concurrency(p, "dead letters")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would happen to each selected dead letter; write nothing (reads "
        "Postgres only: no Kafka, S3 or source is contacted)",
    )
    p.set_defaults(func=run_command)


async def dry_run(settings: Settings, where: FailureFilter, out: TextIO = sys.stdout) -> int:
    """``--dry-run``: what redriving would do, from Postgres alone (no Kafka, no S3, no
    source is contacted: :func:`predict` reads the payload and the recordings table)."""
    from types import SimpleNamespace

    from fileserver.repository import Repository
    from fileserver.runtime import make_engine

    engine = make_engine(settings)
    repo = Repository(engine)
    try:
        failures = await repo.list_failures(where)
        by_reason = Counter(f.reason for f in failures)
        print(
            f"{len(failures)} dead letters selected"
            + (f": {dict(sorted(by_reason.items()))}" if failures else ""),
            file=out,
        )
        reader: Any = SimpleNamespace(repo=repo)
        for failure in failures:
            action = await predict(reader, failure)
            print(
                f"  {failure.kafka_topic}/{failure.kafka_partition}/"
                f"{failure.kafka_offset} [{failure.reason}] would {action}",
                file=out,
            )
        print("dry run: nothing was written", file=out)
        return 0
    finally:
        await repo.close()
        await engine.dispose()


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of ``fileserver redrive``."""
    where = FailureFilter(
        reasons=tuple(args.reason),
        topic=args.topic,
        partitions=tuple(args.partition),
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        limit=args.limit,
    )
    if args.dry_run:
        return asyncio.run(dry_run(settings, where))
    concurrency = settings.concurrency if args.concurrency is None else max(1, args.concurrency)
    return asyncio.run(
        run_redrive(
            with_concurrency(settings, concurrency),
            where,
            dry_run=args.dry_run,
            concurrency=concurrency,
        )
    )
