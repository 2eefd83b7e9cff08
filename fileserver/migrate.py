"""Running the Alembic migrations (``fileserver migrate`` = ``alembic upgrade head``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config


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
