"""Command-line values shared by the operator verbs (backfill, redrive): ISO-8601 times
and ``--concurrency``. Pure: no I/O."""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import UTC, datetime

from fileserver.errors import ConfigError
from fileserver.settings import Settings


def parse_time(value: str, option: str) -> datetime:
    """Parse an ISO-8601 date or date-time; one without a timezone is taken as UTC."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not an ISO-8601 time "
            "(e.g. 2024-05-01T08:30:00Z, 2024-05-01T10:30:00+02:00 or 2024-05-01)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def add_concurrency(parser: argparse._ActionsContainer, what: str) -> None:
    """``--concurrency N``: ``what`` processed at once. Both verbs default to the worker's
    ``FILESERVER_CONCURRENCY``: they run the worker's pipeline with the worker's pools, and
    a gateway is protected by ``FILESERVER_MAX_DOWNLOADS_PER_SOURCE`` either way."""
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help=f"{what} processed at once (default FILESERVER_CONCURRENCY)",
    )


def with_concurrency(settings: Settings, concurrency: int | None) -> Settings:
    """The settings with ``--concurrency`` applied (the pools are sized from it)."""
    if concurrency is None:
        return settings
    n = concurrency
    return replace(settings, concurrency=n, max_pending=max(settings.max_pending, n))
