"""``fileserver backfill``: replay a bounded range of the events topic through the pipeline.

It reads with a group-less consumer (``assign`` + ``seek``), so it never joins, commits
to or otherwise changes the live worker's consumer group. The range is resolved once at
start (``--from-offset``/``--from-time``, ``--to-offset``/``--to-time``, by default up to
the end offsets captured then), so the command always terminates. It never waits behind
the dead-letter breaker either: where the worker would hold events, the run stops
(exit status 4) with a resume command that starts at the first event it did not finish.

Each batch read from Kafka costs one batched ``recordings`` look-up (and one batched
``ingest_failures`` look-up for what is left): events already ingested, events that
already failed and msg_type 2/3 records are counted without any download. The others go
through the worker's :class:`~fileserver.processor.Processor` (same retries, same dead
letters) with bounded concurrency. ``--verify`` re-downloads already-ingested events,
compares them with their row and their stored object, and repairs what is missing.

The package follows the run: :mod:`~fileserver.backfill.ranges` (pure: offsets,
partitions, the plan), :mod:`~fileserver.backfill.options` (the command line, validated),
:mod:`~fileserver.backfill.plan` (times and end offsets from the broker),
:mod:`~fileserver.backfill.run` (reading and dispatching), :mod:`~fileserver.backfill.report`
(outcomes, progress, summary, exit status) and :mod:`~fileserver.backfill.command` (the
parser and the entry point).
"""

from fileserver.backfill.command import add_parser, run_backfill, run_command
from fileserver.backfill.options import BackfillOptions, effective_settings
from fileserver.backfill.plan import resolve_plan
from fileserver.backfill.ranges import (
    OffsetSpec,
    PartitionRange,
    Plan,
    build_plan,
    parse_offsets,
    select_partitions,
    to_millis,
)
from fileserver.backfill.report import (
    EXIT_BREAKER,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    Held,
    Kind,
    Progress,
    Summary,
    Tally,
)
from fileserver.backfill.run import Backfill, RepairResult

__all__ = [
    "EXIT_BREAKER",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "Backfill",
    "BackfillOptions",
    "Held",
    "Kind",
    "OffsetSpec",
    "PartitionRange",
    "Plan",
    "Progress",
    "RepairResult",
    "Summary",
    "Tally",
    "add_parser",
    "build_plan",
    "effective_settings",
    "parse_offsets",
    "resolve_plan",
    "run_backfill",
    "run_command",
    "select_partitions",
    "to_millis",
]
