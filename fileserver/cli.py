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
from fileserver.serve import command as serve
from fileserver.settings import Settings

DESCRIPTION = """\
fileserver ingests push-to-talk recordings: it reads Janus events from Kafka,
downloads each talk burst's .mp3, verifies it, stores it in S3 and records its
metadata in Postgres. Settings come from FILESERVER_* environment variables
(see the settings table in docs/operations.md)."""


#: The verbs, in the order ``fileserver --help`` lists them.
VERBS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    worker.add_parser,
    migrate.add_parser,
    dev.add_parser,
    backfill.add_parser,
    redrive.add_parser,
    reconcile.add_parser,
    serve.add_parser,
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
