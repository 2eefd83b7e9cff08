"""The ``fileserver`` command line: a table of verbs.

Each verb's module owns its parser: ``add_parser(subparsers)`` registers it and sets
``func``, the verb's entry point (``(args, settings) -> exit status``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fileserver import __version__, backfill, logs, migrate, reconcile, redrive, worker
from fileserver.devstack import command as dev
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.settings import Settings

DESCRIPTION = """\
fileserver ingests push-to-talk recordings: it reads Janus events from Kafka,
downloads each talk burst's .mp3, verifies it, stores it in S3 and records its
metadata in Postgres. Settings come from FILESERVER_* environment variables
(see the settings table in docs/operations.md)."""


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
    """Register ``fileserver reconcile`` (until :mod:`fileserver.reconcile` owns its parser)."""
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


#: The verbs, in the order ``fileserver --help`` lists them.
VERBS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    worker.add_parser,
    migrate.add_parser,
    dev.add_parser,
    backfill.add_parser,
    redrive.add_parser,
    getattr(reconcile, "add_parser", _add_reconcile_parser),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fileserver",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fileserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in VERBS:
        add_parser(sub)
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
