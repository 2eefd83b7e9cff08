"""The ``fileserver`` command line: worker, migrate, dev."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from fileserver import __version__, logs
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.settings import Settings

log = logging.getLogger("fileserver")

DESCRIPTION = """\
fileserver ingests push-to-talk recordings: it reads Janus events from Kafka,
downloads each talk burst's .mp3, verifies it, stores it in S3 and records its
metadata in Postgres. Settings come from FILESERVER_* environment variables
(see the README's settings table)."""


async def _preflight(settings: Settings) -> None:
    from fileserver.runtime import open_runtime, preflight

    async with open_runtime(settings) as runtime:
        await preflight(runtime)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run the long-lived ingestion worker."""
    from fileserver.worker import build_app

    log.info("settings: %s", settings.redacted())

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
    import faust

    # override_logging=False: keep fileserver's handler (JSON lines unless a terminal).
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False)
    if not worker.stdout.isatty():
        # faust's start-up spinner writes cursor escapes (ESC[?25h) even when stdout is
        # not a terminal: they would land in front of a JSON log line.
        worker.spinner = None
    if stop_requested:
        log.info("signal %s before the worker started: exiting", stop_requested[0])
        return 0
    worker.execute_from_commandline()
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Upgrade the database schema (``alembic upgrade head``)."""
    from fileserver.migrate import downgrade, upgrade

    if args.revision.startswith("-") or args.downgrade:
        downgrade(settings.database_url, args.revision)
    else:
        upgrade(settings.database_url, args.revision)
    log.info("database schema at %s", args.revision)
    return 0


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded stack and the worker (see ``fileserver dev --help``)."""
    from fileserver.devstack.dev import run_dev

    return run_dev(args)


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    """Replay a bounded range of the events topic (see ``fileserver backfill --help``)."""
    from fileserver.backfill import run_command

    return run_command(args, settings)


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
otherwise; a summary table on stdout at the end. Ctrl-C (or SIGTERM) stops cleanly:
in-flight events are abandoned (a later run redoes them) and the summary says how to
resume.

Exit status: 0 every event ended as a row or a skip; 1 some were dead-lettered, a
--verify problem or an error; 2 configuration error (bad range, unknown topic or
partition, unreachable database or bucket); 3 broker unreachable; 4 stopped by the
dead-letter breaker (run the printed resume command); 130 interrupted."""

BACKFILL_EPILOG = """\
examples:
  fileserver backfill --dry-run                         # count what a full replay would do
  fileserver backfill --from-time 2024-05-01T08:00:00Z  # after an outage that began then
  fileserver backfill --from-time 2024-05-01 --to-time 2024-05-02 --partition 3
  fileserver backfill --from-offset 0:1200 --from-offset 2:980   # partitions 0 and 2 only
  fileserver backfill --from-offset 5000 --to-offset 6000        # [5000, 6000) everywhere
  fileserver backfill --verify --concurrency 16         # re-check objects and rows, repair"""


def _add_backfill_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bf = sub.add_parser(
        "backfill",
        help="replay a range of the events topic through the pipeline, then stop",
        description=BACKFILL_DESCRIPTION,
        epilog=BACKFILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rng = bf.add_argument_group("range")
    rng.add_argument("--topic", help="topic to replay (default FILESERVER_TOPIC)")
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
    how.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="events processed at once (default FILESERVER_CONCURRENCY)",
    )
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
    bf.set_defaults(func=cmd_backfill)


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Compare the bucket with the recordings table (see ``fileserver reconcile --help``)."""
    from fileserver.reconcile import run

    return run(
        settings,
        repair=args.repair,
        json_path=args.json,
        min_age_s=args.min_age,
        quarantine_prefix=args.quarantine_prefix,
        progress=False if args.no_progress else None,
    )


def _add_reconcile_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rc = sub.add_parser(
        "reconcile",
        help="compare the bucket with the recordings table (read-only unless --repair)",
        description="Find rows whose object is missing or whose object's size or md5 differs, "
        "and objects no row points to, in FILESERVER_S3_BUCKET and the recordings table of "
        "FILESERVER_DATABASE_URL. Read-only unless --repair: then a row's object is "
        "downloaded again from its source_url (kept only if its md5 and size equal the row's) "
        "and orphan objects are moved under --quarantine-prefix. Exit status: 0 they agree "
        "(after repair), 1 inconsistencies remain, 2 configuration error, 3 unreachable.",
    )
    rc.add_argument("--repair", action="store_true", help="fix what can be fixed")
    rc.add_argument(
        "--json", metavar="FILE", help="also write the report as JSON to FILE ('-': stdout)"
    )
    rc.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="objects younger than this are not judged orphans (default 3600: the worker "
        "uploads before it inserts the row)",
    )
    rc.add_argument(
        "--quarantine-prefix",
        default="quarantine/",
        metavar="PREFIX",
        help="where --repair moves orphan objects (default quarantine/); never scanned",
    )
    rc.add_argument(
        "--no-progress", action="store_true", help="no progress line even on a terminal"
    )
    rc.set_defaults(func=cmd_reconcile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileserver",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fileserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser(
        "migrate",
        help="upgrade the database schema (same as `alembic upgrade head`)",
        description="Apply the Alembic migrations to FILESERVER_DATABASE_URL.",
    )
    migrate.add_argument(
        "revision", nargs="?", default="head", help="target revision (default head)"
    )
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to REVISION instead")
    migrate.set_defaults(func=cmd_migrate)

    dev = sub.add_parser(
        "dev",
        help="run the embedded dev stack (Tansu, SeaweedFS, Postgres) with sample events",
        description="Start Tansu (Kafka protocol), SeaweedFS (S3) and Postgres on free loopback "
        "ports (no JVM, no Docker), publish sample Janus events, run the worker, print what "
        "landed, and keep running until Ctrl-C.",
    )
    dev.add_argument(
        "--workdir", default=None, help="where servers keep data (default: a temp dir)"
    )
    dev.add_argument(
        "--samples", type=int, default=5, help="sample talk events to publish (default 5)"
    )
    dev.add_argument(
        "--exit-after-samples",
        action="store_true",
        help="stop everything once the samples have landed (for scripts and tests)",
    )
    dev.set_defaults(func=cmd_dev)
    _add_backfill_parser(sub)
    from fileserver import redrive

    redrive.add_parser(sub)
    _add_reconcile_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fileserver`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_level)
        code: int = args.func(args, settings)
        return code
    except ConfigError as exc:
        print(f"fileserver: configuration error: {exc}", file=sys.stderr)
        return 2
    except DependencyUnavailable as exc:
        print(f"fileserver: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
