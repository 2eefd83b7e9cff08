"""Backfill options: one run as given on the command line, validated."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime

from fileserver.backfill.ranges import OffsetSpec, parse_offsets
from fileserver.cliargs import parse_time, with_concurrency
from fileserver.errors import ConfigError
from fileserver.settings import Settings


@dataclass(frozen=True)
class BackfillOptions:
    """One backfill run, as given on the command line."""

    topic: str | None = None
    partitions: tuple[int, ...] = ()
    from_offsets: OffsetSpec | None = None
    from_time: datetime | None = None
    to_offsets: OffsetSpec | None = None
    to_time: datetime | None = None
    concurrency: int | None = None
    verify: bool = False
    dry_run: bool = False
    progress: str = "auto"
    log_interval_s: float = 5.0
    batch_size: int = 2000

    def validate(self) -> None:
        """Reject contradictory options (a :class:`ConfigError`: exit status 2)."""
        if self.from_offsets is not None and self.from_time is not None:
            raise ConfigError("give either --from-offset or --from-time, not both")
        if self.to_offsets is not None and self.to_time is not None:
            raise ConfigError("give either --to-offset or --to-time, not both")
        if self.from_time and self.to_time and self.to_time <= self.from_time:
            raise ConfigError("--to-time must be later than --from-time")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        if self.dry_run and self.verify:
            raise ConfigError("--dry-run only counts: it cannot be combined with --verify")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ConfigError("--progress must be auto, bar, log or none")
        if not self.log_interval_s > 0 or self.batch_size < 1:  # NaN is not > 0 either
            raise ConfigError("--log-interval and the batch size must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BackfillOptions:
        """Build (and validate) options from the ``fileserver backfill`` arguments."""
        for p in args.partition or []:
            if p < 0:
                raise ConfigError(f"--partition {p}: partitions are non-negative")
        options = cls(
            topic=args.topic,
            partitions=tuple(args.partition or ()),
            from_offsets=parse_offsets(args.from_offset or [], "--from-offset"),
            from_time=parse_time(args.from_time, "--from-time") if args.from_time else None,
            to_offsets=parse_offsets(args.to_offset or [], "--to-offset"),
            to_time=parse_time(args.to_time, "--to-time") if args.to_time else None,
            concurrency=args.concurrency,
            verify=args.verify,
            dry_run=args.dry_run,
            progress=args.progress,
            log_interval_s=args.log_interval,
        )
        options.validate()
        return options


def effective_settings(settings: Settings, options: BackfillOptions) -> Settings:
    """The settings with ``--concurrency`` applied (pools are sized from it)."""
    return with_concurrency(settings, options.concurrency)
