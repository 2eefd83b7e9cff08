"""Running the Alembic migrations (``fileserver migrate`` = ``alembic upgrade head``)."""

from __future__ import annotations

import argparse
import logging
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config

from fileserver.settings import Settings


def script_location() -> str:
    """Where the migration scripts are: the repository's ``migrations/`` or the wheel's copy."""
    repo = Path(__file__).resolve().parent.parent / "migrations"
    if (repo / "env.py").exists():
        return str(repo)
    return str(files("fileserver._migrations"))


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that does not touch logging."""
    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base`` drops every table)."""
    command.downgrade(alembic_config(database_url), revision)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver migrate``."""
    migrate = sub.add_parser(
        "migrate",
        help="upgrade the database schema (same as `alembic upgrade head`)",
        description="Apply the Alembic migrations to FILESERVER_DATABASE_URL.",
    )
    migrate.add_argument(
        "revision", nargs="?", default="head", help="target revision (default head)"
    )
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to REVISION instead")
    migrate.set_defaults(func=run_command)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Upgrade the database schema (``alembic upgrade head``)."""
    if args.revision.startswith("-") or args.downgrade:
        downgrade(settings.database_url, args.revision)
    else:
        upgrade(settings.database_url, args.revision)
    logging.getLogger("fileserver").info("database schema at %s", args.revision)
    return 0
