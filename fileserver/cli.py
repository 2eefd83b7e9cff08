"""The ``fileserver`` command line: worker, migrate, dev."""

from __future__ import annotations

import argparse
import asyncio
import logging
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
    asyncio.run(_preflight(settings))
    app = build_app(settings, shutdown_grace_s=args.shutdown_grace)
    import faust

    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
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
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight events may take to finish (default 30)",
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
