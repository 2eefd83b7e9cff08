"""``fileserver backfill``: its parser, the run with its progress and summary, exit status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from fileserver.backfill.options import BackfillOptions, effective_settings
from fileserver.backfill.plan import resolve_plan
from fileserver.backfill.ranges import Plan
from fileserver.backfill.report import Progress, Summary, Tally
from fileserver.backfill.run import Backfill
from fileserver.cliargs import add_concurrency
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.runtime import make_reader, open_runtime, preflight
from fileserver.settings import Settings
from fileserver.summary import Output, add_json_option

log = logging.getLogger("fileserver.backfill")

BACKFILL_DESCRIPTION = """\
Replay a range of the events topic through the same ingest pipeline as the worker,
idempotently, and stop. It reads without a consumer group (assign + seek): the live
worker's group and its committed offsets are never touched, so it is safe to run
beside a running worker.

Events whose row already exists are counted without any download (unless --verify);
msg_type 2/3 records are skipped; an event that already has a failure row is skipped
too, so it is never dead-lettered twice (re-process dead letters with `fileserver
redrive`). Everything else follows the worker's rules: a row and an object, or a
failure row and a dead letter.

Range: --from-offset is inclusive, --to-offset is EXCLUSIVE (like Kafka's end offsets).
Either takes N (every selected partition) or PARTITION:N pairs, repeated or comma-
separated. Without a start the range begins at the earliest retained offset; without a
stop it ends at the end offsets captured when the command starts, so it always
terminates. When --from-offset gives only PARTITION:N pairs (and no --partition), only
those partitions are replayed. --from-time/--to-time take ISO-8601 (a date, or a date
and time; no timezone means UTC) and compare with the Kafka record timestamps (when the
event was published), resolved with the broker's offsets-for-times.

Progress: one updating line on a terminal, a log line every --log-interval seconds
otherwise; a summary table on stdout at the end. --json prints the summary as one JSON
object on stdout instead (the table goes to stderr; --json FILE writes it to FILE). Ctrl-C
(or SIGTERM) stops cleanly: in-flight events are abandoned (a later run redoes them) and
the summary says how to resume.

Exit status (the table of `fileserver --help`): 0 every event ended as a row or a skip;
1 some were dead-lettered, a --verify problem or an error; 2 configuration error (bad
range, unknown topic or partition); 3 the database, the bucket or the broker unreachable;
4 stopped by the dead-letter breaker (run the printed resume command); 130 interrupted."""

BACKFILL_EPILOG = """\
examples:
  fileserver backfill --dry-run                         # count what a full replay would do
  fileserver backfill --from-time 2024-05-01T08:00:00Z  # after an outage that began then
  fileserver backfill --from-time 2024-05-01 --to-time 2024-05-02 --partition 3
  fileserver backfill --from-offset 0:1200 --from-offset 2:980   # partitions 0 and 2 only
  fileserver backfill --from-offset 5000 --to-offset 6000        # [5000, 6000) everywhere
  fileserver backfill --verify --concurrency 16         # re-check objects and rows, repair"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver backfill``."""
    bf = sub.add_parser(
        "backfill",
        help="replay a range of the events topic through the pipeline, then stop",
        description=BACKFILL_DESCRIPTION,
        epilog=BACKFILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rng = bf.add_argument_group("range")
    rng.add_argument("--topic", metavar="TOPIC", help="topic to replay (default FILESERVER_TOPIC)")
    rng.add_argument(
        "--partition",
        type=int,
        action="append",
        metavar="P",
        help="replay this partition (repeatable; default all)",
    )
    rng.add_argument(
        "--from-offset",
        action="append",
        metavar="N|P:N",
        help="first offset, inclusive (repeatable; default the earliest retained)",
    )
    rng.add_argument(
        "--from-time",
        metavar="ISO-8601",
        help="start at the first record published at or after this time (naive = UTC)",
    )
    rng.add_argument(
        "--to-offset",
        action="append",
        metavar="N|P:N",
        help="stop offset, EXCLUSIVE (repeatable; default the end offsets at start)",
    )
    rng.add_argument(
        "--to-time",
        metavar="ISO-8601",
        help="stop before the first record published at or after this time (naive = UTC)",
    )
    how = bf.add_argument_group("behaviour")
    add_concurrency(how, "events")
    how.add_argument(
        "--verify",
        action="store_true",
        help="also re-download already-ingested events, compare md5 and size with the row, "
        "check the stored object (size, md5 metadata) and re-upload it when missing or "
        "different; a missing row over an already stored object is reported as a repaired "
        "row; each repair is logged and listed in the summary",
    )
    how.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the range and count events per class (new, already ingested, not a talk "
        "event, invalid, already failed) without downloading or writing anything",
    )
    how.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="progress display: a line on a terminal, log lines otherwise (default auto)",
    )
    how.add_argument(
        "--log-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress log lines when not on a terminal (default 5)",
    )
    add_json_option(how, "the summary")
    bf.set_defaults(func=run_command)


class _Job:
    def __init__(
        self, settings: Settings, options: BackfillOptions, out: TextIO, err: TextIO
    ) -> None:
        self.settings = settings
        self.options = options
        self.out = out
        self.err = err
        self.tally = Tally()
        self.plan: Plan | None = None
        self.backfill: Backfill | None = None
        self.started: float | None = None

    async def run(self) -> None:
        settings = self.settings
        topic = self.options.topic or settings.topic
        # hold=False: an event the dead-letter breaker would hold raises BreakerOpen, and
        # the run stops (exit status 4) instead of waiting for the cause to go away.
        async with open_runtime(settings, hold=False) as runtime:
            await preflight(runtime)
            consumer = make_reader(settings)
            try:
                await consumer.start()
            except KafkaError as exc:
                await consumer.stop()
                raise DependencyUnavailable(
                    "kafka",
                    f"cannot reach FILESERVER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}: {exc}",
                ) from None
            try:
                self.plan = await resolve_plan(consumer, topic, self.options)
                print(self.plan.describe(), file=self.out, flush=True)
                log.info(
                    "backfill plan: topic %s, %d offsets, %s%s",
                    topic,
                    self.plan.total,
                    " ".join(f"{r.partition}:[{r.start},{r.stop})" for r in self.plan.ranges),
                    " (dry run)" if self.options.dry_run else "",
                )
                self.backfill = Backfill(
                    runtime, self.plan, self.options, self.tally, concurrency=settings.concurrency
                )
                progress = Progress(
                    self.tally,
                    self.plan.total,
                    mode=self.options.progress,
                    stream=self.err,
                    interval_s=self.options.log_interval_s,
                    status=lambda: None if runtime.health.ok else runtime.health.reason,
                )
                self.started = time.monotonic()
                ticker = asyncio.create_task(progress.run())
                try:
                    await self.backfill.run(consumer)
                finally:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
            finally:
                await consumer.stop()

    def summary(self, *, interrupted: bool, error: str | None) -> Summary:
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        halted = self.backfill.halted if self.backfill else None
        stopped = interrupted or halted is not None
        resume = self.backfill.resume_offsets() if self.backfill and stopped else {}
        return Summary(
            plan=self.plan,
            dry_run=self.options.dry_run,
            counts=Counter(self.tally.counts),
            elapsed_s=elapsed,
            interrupted=interrupted,
            error=error,
            resume=resume,
            repairs=list(self.tally.repairs),
            problems=list(self.tally.problems),
            breaker=halted.detail if halted is not None else None,
            held=list(self.backfill.held) if self.backfill else [],
            dead_lettered_by_reason=Counter(self.tally.dead_lettered_by_reason),
            verify=self.options.verify,
        )


async def run_backfill(
    settings: Settings,
    options: BackfillOptions,
    *,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Summary:
    """Run one backfill; setting ``stop`` ends it early, with a summary of what was done.

    An event the dead-letter breaker would hold ends it early too (exit status 4), with
    the same resume command: a backfill never waits behind the breaker.

    Raises :class:`ConfigError` (bad range, missing topic, unreachable database or
    bucket) and :class:`DependencyUnavailable` (broker unreachable) before any record is
    read; afterwards every failure is in the summary.
    """
    options.validate()
    out = out or sys.stdout
    err = err or sys.stderr
    job = _Job(effective_settings(settings, options), options, out, err)
    work = asyncio.create_task(job.run(), name="backfill")
    waiters: set[asyncio.Future[Any]] = {work}
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopper is not None:
        waiters.add(stopper)
    interrupted = False
    error: str | None = None
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            interrupted = True
            log.warning("interrupted: stopping the backfill")
            work.cancel()
        try:
            await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not interrupted or (current is not None and current.cancelling()):
                raise
        except (ConfigError, DependencyUnavailable) as exc:
            if job.plan is None:
                raise
            log.exception("backfill failed")
            error = str(exc)
        except Exception as exc:
            log.exception("backfill failed")
            error = f"{type(exc).__name__}: {exc}"
    finally:
        if stopper is not None:
            stopper.cancel()
        if not work.done():
            work.cancel()
    summary = job.summary(interrupted=interrupted, error=error)
    print(summary.render(), file=out, flush=True)
    if summary.breaker is not None:
        state = f"stopped by the dead-letter breaker ({summary.breaker})"
    else:
        state = "interrupted" if interrupted else "finished"
    log.info(
        "backfill %s: %s (exit status %d)",
        state,
        summary.one_line() or "nothing to do",
        summary.exit_code,
    )
    return summary


async def _main(settings: Settings, options: BackfillOptions, output: Output) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            return
        print(f"\n{sig.name}: stopping (again to abort at once)", file=sys.stderr, flush=True)
        stop.set()
        loop.remove_signal_handler(sig)  # a second Ctrl-C gets Python's default behaviour

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        summary = await run_backfill(settings, options, stop=stop, out=output.text)
        # still under the handlers: a signal now must not cut the object in half
        return output.emit("backfill", summary.as_json(), summary.exit_code)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """``fileserver backfill``: returns the exit status (0, 1, 4 or 130; see :class:`Summary`)."""
    options = BackfillOptions.from_args(args)
    output = Output(args.json)
    try:
        return asyncio.run(_main(settings, options, output))
    except KeyboardInterrupt:
        # after the summary, asyncio.run still joins the default executor's threads (an
        # abandoned event's analysis): a Ctrl-C then does not belie the printed status
        if output.emitted is None:
            raise
        return output.emitted
