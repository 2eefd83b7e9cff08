"""The ``fileserver`` command line: a table of verbs.

Each verb's module owns its parser: ``add_parser(subparsers)`` registers it and sets
``func``, the verb's entry point (``(args, settings) -> exit status``, see
:mod:`fileserver.exits`).

The verb modules import the pipeline (faust, boto3, SQLAlchemy, aiohttp...), so a verb's
module is imported only when that verb's parser is needed: ``fileserver --help`` lists
the verbs from :data:`VERBS` alone, and ``fileserver backfill ...`` imports the backfill
module and nothing of the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fileserver import __version__, exits, logs
from fileserver.errors import ConfigError
from fileserver.settings import Settings, env_name, redact_url, unknown_variables

DESCRIPTION = """\
fileserver ingests push-to-talk recordings: it reads Janus events from Kafka,
downloads each talk burst's .mp3, verifies it, stores it in S3 and records its
metadata in Postgres. Settings come from FILESERVER_* environment variables
(`fileserver config` lists them; see also the settings table in docs/operations.md)."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Verb:
    """One verb: its name, its one-line help, and the module whose ``add_parser``
    builds its parser (imported only when the verb is used)."""

    name: str
    module: str
    help: str


#: The verbs, in the order ``fileserver --help`` lists them. ``help`` is the verb's
#: one line in that list; its module's ``add_parser`` passes the same words (tested).
VERBS: tuple[Verb, ...] = (
    Verb("worker", "fileserver.worker", "run the ingestion worker (the default container command)"),
    Verb(
        "migrate",
        "fileserver.migrate",
        "upgrade the database schema (same as `alembic upgrade head`)",
    ),
    Verb(
        "dev",
        "fileserver.devstack.command",
        "run the embedded dev stack (Tansu, SeaweedFS, Postgres) with sample events",
    ),
    Verb(
        "backfill",
        "fileserver.backfill.command",
        "replay a range of the events topic through the pipeline, then stop",
    ),
    Verb(
        "redrive",
        "fileserver.redrive",
        "re-process dead letters through the pipeline (fixes after an outage or a bug)",
    ),
    Verb(
        "reconcile",
        "fileserver.reconcile",
        "compare the bucket with the recordings table (read-only unless --repair)",
    ),
    Verb(
        "serve",
        "fileserver.serve.command",
        "serve the recordings: a read API (OpenAPI at /openapi.json) and a review page",
    ),
    Verb(
        "config",
        "fileserver.config",
        "list every setting (default, current value, meaning); --check validates them",
    ),
)


def _level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def add_global_options(parser: argparse.ArgumentParser, *, on_verb: bool) -> None:
    """``-l/--log-level`` and ``--log-format``, accepted before and after the verb (on
    the verb's parser their default is SUPPRESS, so it never hides a value given before)."""
    default: Any = argparse.SUPPRESS if on_verb else None
    group = parser.add_argument_group("logging (before or after the command)")
    group.add_argument(
        "-l",
        "--log-level",
        type=_level,
        default=default,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default FILESERVER_LOG_LEVEL, INFO)",
    )
    group.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default=default,
        help="json: one JSON object per line; text: readable; auto: json unless stderr is a "
        "terminal (default FILESERVER_LOG_FORMAT, auto)",
    )


class _Adopt:
    """What a verb's ``add_parser(sub)`` is given by :class:`VerbParser`: ``sub.add_parser``
    configures the already registered parser instead of making a new one."""

    def __init__(self, parser: VerbParser) -> None:
        self.parser = parser
        self.help: str | None = None

    def add_parser(self, name: str, *, help: str | None = None, **kwargs: Any) -> VerbParser:
        if name != self.parser.verb.name:
            raise ValueError(
                f"{self.parser.verb.module} registers {name!r}, not {self.parser.verb.name!r}"
            )
        self.help = help
        for key, value in kwargs.items():
            if not hasattr(self.parser, key):
                raise TypeError(f"unexpected parser option {key!r}")
            setattr(self.parser, key, value)
        return self.parser


class VerbParser(argparse.ArgumentParser):
    """A verb's parser, filled by its module's ``add_parser`` the first time it is used
    (parsing its arguments, or printing its help)."""

    def __init__(self, *, verb: Verb, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verb = verb
        self.loaded: _Adopt | None = None
        add_global_options(self, on_verb=True)

    def load(self) -> _Adopt:
        if self.loaded is None:
            adopt = _Adopt(self)
            importlib.import_module(self.verb.module).add_parser(adopt)
            self.loaded = adopt
        return self.loaded

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.load()
        return super().format_help()

    def format_usage(self) -> str:
        self.load()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each verb's own options are added when the verb is used."""
    parser = argparse.ArgumentParser(
        prog="fileserver",
        description=DESCRIPTION,
        epilog=exits.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fileserver {__version__}")
    add_global_options(parser, on_verb=False)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=VerbParser
    )
    for verb in VERBS:
        sub.add_parser(verb.name, help=verb.help, verb=verb)
    return parser


def _env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """A raw ``FILESERVER_*`` value, before the settings are read (for the logs of a
    command whose settings turn out to be wrong)."""
    raw = os.environ.get(name, "").strip()
    for choice in choices:
        if raw.lower() == choice.lower():
            return choice
    return default


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fileserver`` console script; returns the exit status."""
    _no_closed_streams()
    args = build_parser().parse_args(argv)
    log_format: str = args.log_format or _env_choice(
        "FILESERVER_LOG_FORMAT", logs.LOG_FORMATS, "auto"
    )
    json_lines = logs.wants_json(log_format)
    level: str = args.log_level or _env_choice("FILESERVER_LOG_LEVEL", LOG_LEVELS, "INFO")
    logs.configure(level, json_lines=json_lines)
    try:
        settings: Settings | None = None
        if not getattr(args, "settings_free", False):  # `config` reads them itself
            for name, closest in unknown_variables(os.environ):
                hint = f" (did you mean {closest}?)" if closest else ""
                logging.getLogger("fileserver").warning(
                    "%s is not a setting and is ignored%s", name, hint
                )
            settings = Settings.from_env()
            if args.log_level is None and settings.log_level != level:
                logging.getLogger().setLevel(settings.log_level)
        code: int = args.func(args, settings)
        return code
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BrokenPipeError:  # `fileserver config | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.INCOMPLETE
    except ConfigError as exc:
        return _fatal(exc, json_lines, settings)
    except Exception as exc:
        if exits.unreachable(exc) is not None:
            return _fatal(exc, json_lines, settings)
        logging.getLogger("fileserver").critical(
            "fileserver %s failed: %s: %s", args.command, type(exc).__name__, exc, exc_info=True
        )
        return exits.INCOMPLETE


def _no_closed_streams() -> None:
    """A stream closed by the caller (``2>&-``) is ``None`` in :mod:`sys`: ``print(...,
    file=None)`` would write stderr's text on stdout (before a ``--json`` object), and
    ``None.isatty()`` fails. Such a stream becomes the null device."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115


def _fatal(exc: Exception, json_lines: bool, settings: Settings | None) -> int:
    """Report a configuration error (2) or an unreachable dependency (3) in one line; the
    latter names the setting that says where the dependency is."""
    status = exits.status_for(exc)
    dependency = exits.unreachable(exc)
    fields: dict[str, Any]
    # one line, whatever the driver's message looks like (psycopg's has several)
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if dependency is not None:
        kind = "dependency unreachable"
        fields = {"error": "dependency_unreachable", "dependency": dependency.dependency}
        names = exits.SETTINGS_OF.get(dependency.dependency, ())
        if settings is not None and names and "FILESERVER_" not in message:
            where = " ".join(
                f"{env_name(n)}={redact_url(str(getattr(settings, n)))}" for n in names
            )
            message = f"{message} ({where})"
    else:
        kind = "configuration error"
        fields = {"error": "configuration"}
    logs.fatal(f"{kind}: {message}", json_lines=json_lines, status=status, **fields)
    return status


if __name__ == "__main__":
    sys.exit(main())
