"""Running the Alembic migrations (``fileserver migrate`` = ``alembic upgrade head``).

Alembic and SQLAlchemy are imported when a migration runs, not when the parser is built."""

from __future__ import annotations

import argparse
import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileserver.errors import DependencyUnavailable
from fileserver.settings import Settings, redact_url

if TYPE_CHECKING:
    from alembic.config import Config


def script_location() -> str:
    """Where the migration scripts are: the repository's ``migrations/`` or the wheel's copy."""
    repo = Path(__file__).resolve().parent.parent / "migrations"
    if (repo / "env.py").exists():
        return str(repo)
    return str(files("fileserver._migrations"))


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that does not touch logging."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base`` drops every table)."""
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver migrate``."""
    migrate = sub.add_parser(
        "migrate",
        help="upgrade the database schema (same as `alembic upgrade head`)",
        description="Apply the Alembic migrations to FILESERVER_DATABASE_URL, or show where "
        "it is (--current), the migrations there are (--history), or print the SQL of an "
        "upgrade instead of running it (--sql, offline: no database needed).",
    )
    migrate.add_argument(
        "revision", nargs="?", default="head", help="target revision (default head)"
    )
    what = migrate.add_mutually_exclusive_group()
    what.add_argument("--downgrade", action="store_true", help="downgrade to REVISION instead")
    what.add_argument(
        "--current", action="store_true", help="print the database's revision and exit"
    )
    what.add_argument(
        "--history", action="store_true", help="list the migrations (newest first) and exit"
    )
    what.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL of the upgrade (or --downgrade FROM:TO) instead of running it; "
        "offline: does not connect",
    )
    migrate.set_defaults(func=run_command)


def _unreachable(settings: Settings, exc: BaseException) -> DependencyUnavailable:
    """SQLAlchemy's connection error as one line naming the setting (exit status 3)."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return DependencyUnavailable(
        "postgres",
        f"cannot reach the database at FILESERVER_DATABASE_URL="
        f"{redact_url(settings.database_url)}: {detail[0] if detail else type(exc).__name__}",
    )


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Upgrade the database schema (``alembic upgrade head``), or the other actions."""
    from alembic import command
    from sqlalchemy.exc import InterfaceError, OperationalError

    cfg = alembic_config(settings.database_url)
    downgrading = args.revision.startswith("-") or args.downgrade
    try:
        if args.current:
            command.current(cfg)
            return 0
        if args.history:
            command.history(cfg)
            return 0
        if args.sql:
            run: Any = command.downgrade if downgrading else command.upgrade
            run(cfg, args.revision, sql=True)
            return 0
        if downgrading:
            command.downgrade(cfg, args.revision)
        else:
            command.upgrade(cfg, args.revision)
    except (OperationalError, InterfaceError) as exc:
        raise _unreachable(settings, exc) from None
    logging.getLogger("fileserver").info("database schema at %s", args.revision)
    return 0
