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
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TextIO

from fileserver import exits
from fileserver.cliargs import add_concurrency, parse_time, with_concurrency
from fileserver.errors import PermanentError
from fileserver.events import SkippedEvent, parse_event
from fileserver.pipeline import Result
from fileserver.record import SourceRecord
from fileserver.repository import FailureFilter, FailureRow, Repository
from fileserver.runtime import Runtime, make_engine, open_runtime
from fileserver.settings import Settings
from fileserver.summary import Output, add_json_option

log = logging.getLogger("fileserver.redrive")

RECOVERED = "recovered"
FAILED_AGAIN = "failed_again"

#: What a dry run predicts for one dead letter (``Prediction.action``).
RE_INGEST = "re_ingest"
CLEAR = "clear"
FAIL_AGAIN = "fail_again"


def _record(failure: FailureRow) -> SourceRecord:
    return SourceRecord(
        topic=failure.kafka_topic,
        partition=failure.kafka_partition,
        offset=failure.kafka_offset,
        value=failure.payload,
        redrive=True,
    )


@dataclass(frozen=True)
class Prediction:
    """What redriving one dead letter would do: ``action`` (re_ingest, clear or
    fail_again), the reason it would fail again with, and a readable detail."""

    action: str
    detail: str
    reason: str | None = None

    def __str__(self) -> str:
        if self.action == FAIL_AGAIN:
            return f"fail again: {self.reason} ({self.detail})"
        if self.action == CLEAR:
            return f"clear: {self.detail}"
        return f"re-ingest from {self.detail}"


async def predict(runtime: Runtime, failure: FailureRow) -> Prediction:
    """What redriving ``failure`` would do, without downloading or writing anything."""
    try:
        parsed = parse_event(failure.payload)
    except PermanentError as exc:
        return Prediction(FAIL_AGAIN, exc.detail[:80], exc.reason.value)
    if isinstance(parsed, SkippedEvent):
        return Prediction(CLEAR, f"msg_type {parsed.msg_type} is skipped, not ingested")
    if await runtime.repo.recording_md5(parsed.file_path) is not None:
        return Prediction(CLEAR, "a row for this recording already exists")
    return Prediction(RE_INGEST, parsed.file_path[:120])


@dataclass
class Report:
    """What one redrive did (or, with ``dry_run``, would do); :attr:`exit_code`."""

    dry_run: bool
    #: the selected dead letters by their reason when selected
    selected_by_reason: Counter[str] = field(default_factory=Counter)
    #: dry run: each selected dead letter and what redriving it would do
    predictions: list[tuple[FailureRow, Prediction]] = field(default_factory=list)
    #: the dead letters that became rows, by outcome (ingested, duplicate, skipped...)
    recovered_by_outcome: Counter[str] = field(default_factory=Counter)
    #: the dead letters that failed again, by their new reason
    failed_again_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def selected(self) -> int:
        return sum(self.selected_by_reason.values())

    @property
    def recovered(self) -> int:
        return sum(self.recovered_by_outcome.values())

    @property
    def exit_code(self) -> int:
        """0: every selected dead letter recovered (or none selected, or a dry run);
        1: some failed again."""
        if self.dry_run:
            return exits.OK
        return exits.OK if self.recovered == self.selected else exits.INCOMPLETE

    def selection(self) -> str:
        """The first line: how many were selected, by reason."""
        by_reason = dict(sorted(self.selected_by_reason.items()))
        return f"{self.selected} dead letters selected" + (f": {by_reason}" if by_reason else "")

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` summary's own keys (docs/operations.md, JSON summaries)."""
        doc: dict[str, Any] = {
            "mode": "dry-run" if self.dry_run else "redrive",
            "selected": self.selected,
            "selected_by_reason": dict(sorted(self.selected_by_reason.items())),
        }
        if self.dry_run:
            doc["would"] = {
                action: sum(1 for _, p in self.predictions if p.action == action)
                for action in (RE_INGEST, CLEAR, FAIL_AGAIN)
            }
            doc["dead_letters"] = [
                {
                    "topic": f.kafka_topic,
                    "partition": f.kafka_partition,
                    "offset": f.kafka_offset,
                    "reason": f.reason,
                    "would": p.action,
                    "would_reason": p.reason,
                    "detail": p.detail,
                }
                for f, p in self.predictions
            ]
        else:
            doc["recovered"] = self.recovered
            doc["recovered_by_outcome"] = dict(sorted(self.recovered_by_outcome.items()))
            doc["failed_again"] = sum(self.failed_again_by_reason.values())
            doc["failed_again_by_reason"] = dict(sorted(self.failed_again_by_reason.items()))
        return doc


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


async def _select(
    repo: Repository, where: FailureFilter, report: Report, out: TextIO
) -> list[FailureRow]:
    failures = await repo.list_failures(where)
    report.selected_by_reason.update(f.reason for f in failures)
    print(report.selection(), file=out)
    return failures


async def run_redrive(
    settings: Settings,
    where: FailureFilter,
    *,
    concurrency: int,
    out: TextIO = sys.stdout,
) -> Report:
    """Redrive the dead letters selected by ``where`` (exit code 0 when all recovered)."""
    report = Report(dry_run=False)
    async with open_runtime(settings) as runtime:
        failures = await _select(runtime.repo, where, report, out)
        slots = asyncio.Semaphore(concurrency)
        done = 0

        async def one(failure: FailureRow) -> None:
            nonlocal done
            async with slots:
                kind, what = await redrive_one(runtime, failure)
            if kind == RECOVERED:
                report.recovered_by_outcome[what] += 1
            else:
                report.failed_again_by_reason[what] += 1
            done += 1
            if done % 100 == 0 or done == len(failures):
                print(f"  {done}/{len(failures)} redriven", file=out)

        await asyncio.gather(*(one(f) for f in failures))
    print(f"recovered: {report.recovered}", file=out)
    for reason, n in sorted(report.failed_again_by_reason.items()):
        print(f"failed again: {n} {reason}", file=out)
    return report


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
    add_json_option(p, "the summary (with --dry-run: each dead letter's prediction)")
    p.set_defaults(func=run_command)


async def dry_run(settings: Settings, where: FailureFilter, out: TextIO = sys.stdout) -> Report:
    """``--dry-run``: what redriving would do, from Postgres alone (no Kafka, no S3, no
    source is contacted: :func:`predict` reads the payload and the recordings table)."""
    report = Report(dry_run=True)
    engine = make_engine(settings)
    repo = Repository(engine)
    try:
        reader: Any = SimpleNamespace(repo=repo)
        for failure in await _select(repo, where, report, out):
            prediction = await predict(reader, failure)
            report.predictions.append((failure, prediction))
            print(
                f"  {failure.kafka_topic}/{failure.kafka_partition}/"
                f"{failure.kafka_offset} [{failure.reason}] would {prediction}",
                file=out,
            )
        print("dry run: nothing was written", file=out)
        return report
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
    output = Output(args.json)
    if args.dry_run:
        report = asyncio.run(dry_run(settings, where, out=output.text))
    else:
        concurrency = settings.concurrency if args.concurrency is None else max(1, args.concurrency)
        report = asyncio.run(
            run_redrive(
                with_concurrency(settings, concurrency),
                where,
                concurrency=concurrency,
                out=output.text,
            )
        )
    return output.emit("redrive", report.as_json(), report.exit_code)
