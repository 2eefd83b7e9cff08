"""The pure part of ``fileserver backfill``: range options, partition selection, the plan."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from fileserver.backfill import (
    BackfillOptions,
    Kind,
    OffsetSpec,
    PartitionRange,
    Plan,
    Progress,
    Summary,
    Tally,
    build_plan,
    parse_offsets,
    select_partitions,
    to_millis,
)
from fileserver.cli import build_parser
from fileserver.cliargs import parse_time
from fileserver.errors import ConfigError


def test_offsets_for_every_partition_and_per_partition() -> None:
    assert parse_offsets([], "--from-offset") is None
    spec = parse_offsets(["100"], "--from-offset")
    assert spec == OffsetSpec(100, {})
    assert spec is not None and spec.get(7) == 100 and not spec.only_pairs

    pairs = parse_offsets(["0:100", "2:50"], "--from-offset")
    assert pairs == OffsetSpec(None, {0: 100, 2: 50})
    assert pairs is not None and pairs.only_pairs and pairs.get(1) is None

    mixed = parse_offsets(["10", "1:5,2:1_000"], "--to-offset")
    assert mixed == OffsetSpec(10, {1: 5, 2: 1000})
    assert mixed is not None and (mixed.get(0), mixed.get(1)) == (10, 5)
    # The same value twice is harmless.
    assert parse_offsets(["3", "3", "1:2", "1:2"], "--from-offset") == OffsetSpec(3, {1: 2})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["-1"], "non-negative"),
        (["x"], "non-negative"),
        (["1:-5"], "non-negative"),
        (["a:5"], "the partition"),
        (["1:"], "the offset"),
        (["5", "6"], "two offsets for every partition"),
        (["1:5", "1:6"], "partition 1 given twice"),
        (["1,,2:3"], "empty item"),
    ],
)
def test_bad_offsets_name_the_option(values: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_offsets(values, "--to-offset")
    assert "--to-offset" in str(info.value)


def test_times_are_iso_8601_and_naive_means_utc() -> None:
    assert parse_time("2024-05-01T08:30:00Z", "--from-time") == datetime(
        2024, 5, 1, 8, 30, tzinfo=UTC
    )
    assert parse_time("2024-05-01T08:30:00", "--from-time") == datetime(
        2024, 5, 1, 8, 30, tzinfo=UTC
    )
    assert parse_time("2024-05-01", "--from-time") == datetime(2024, 5, 1, tzinfo=UTC)
    plus2 = parse_time("2024-05-01T10:30:00+02:00", "--to-time")
    assert plus2.utcoffset() == timedelta(hours=2)
    assert to_millis(plus2) == to_millis(datetime(2024, 5, 1, 8, 30, tzinfo=UTC))
    assert to_millis(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1000
    # exact to the millisecond (no float rounding): 2024-05-01T00:00:00.032Z
    assert to_millis(parse_time("2024-05-01T00:00:00.032+00:00", "--from-time")) == (1714521600032)
    with pytest.raises(ConfigError, match="--from-time 'yesterday' is not an ISO-8601 time"):
        parse_time("yesterday", "--from-time")
    with pytest.raises(ConfigError, match="before 1970"):
        to_millis(datetime(1969, 12, 31, tzinfo=UTC))


def test_partition_selection() -> None:
    assert select_partitions([0, 1, 2], []) == [0, 1, 2]
    assert select_partitions([0, 1, 2], [2, 0, 2]) == [0, 2]
    pairs = OffsetSpec(None, {0: 100, 2: 50})
    # Only P:N pairs: only those partitions.
    assert select_partitions([0, 1, 2], [], pairs) == [0, 2]
    # A bare N selects every partition, pairs override it per partition.
    assert select_partitions([0, 1, 2], [], OffsetSpec(5, {2: 50})) == [0, 1, 2]
    # --to-offset pairs never narrow the selection.
    assert select_partitions([0, 1, 2], [], None, OffsetSpec(None, {1: 9})) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"has partitions 0,1,2; --partition 3,7 does not"):
        select_partitions([0, 1, 2], [3, 7, 1], topic="events")
    with pytest.raises(ConfigError, match="--from-offset names partition 2 which is not selected"):
        select_partitions([0, 1, 2], [0, 1], pairs)
    with pytest.raises(ConfigError, match="--to-offset names partition 5 which does not exist"):
        select_partitions([0, 1, 2], [], None, OffsetSpec(None, {5: 1}))


def test_plan_defaults_to_the_whole_retained_range_up_to_the_end_snapshot() -> None:
    plan = build_plan(
        "t",
        [0, 1],
        beginning={0: 0, 1: 40},
        end={0: 100, 1: 90},
        starts={0: None, 1: None},
        stops={0: None, 1: None},
    )
    assert plan.ranges == (PartitionRange(0, 0, 100), PartitionRange(1, 40, 90))
    assert plan.total == 150 and plan.notes == ()


def test_plan_clamps_to_what_the_broker_holds_and_says_so() -> None:
    plan = build_plan(
        "t",
        [0, 1, 2, 3],
        beginning={0: 10, 1: 0, 2: 0, 3: 0},
        end={0: 100, 1: 50, 2: 50, 3: 50},
        starts={0: 5, 1: 20, 2: 70, 3: 30},
        stops={0: 60, 1: 500, 2: None, 3: 10},
    )
    assert plan.ranges == (
        PartitionRange(0, 10, 60),  # offsets 5..9 are gone (retention)
        PartitionRange(1, 20, 50),  # cannot read past the end captured at start
        PartitionRange(2, 50, 50),  # start past the end: nothing
        PartitionRange(3, 30, 30),  # stop before start: nothing
    )
    assert plan.total == 80
    text = "\n".join(plan.notes)
    assert "partition 0: offset 5 is no longer retained; starting at 10" in text
    assert "partition 1: stop 500 is past the end offset 50" in text
    assert "partition 2: start 70 is past the end offset 50" in text
    assert "partition 3" not in text
    assert "partition 1: offsets 20 to 50 (exclusive, 30 records)" in plan.describe()


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["backfill", *argv])


def test_command_line_to_options() -> None:
    options = BackfillOptions.from_args(
        _args(
            "--from-offset",
            "0:100",
            "--from-offset",
            "2:50",
            "--to-time",
            "2024-05-01T00:00:00+02:00",
            "--partition",
            "0",
            "--partition",
            "2",
            "--concurrency",
            "8",
            "--verify",
        )
    )
    assert options.from_offsets == OffsetSpec(None, {0: 100, 2: 50})
    assert options.to_time == datetime(2024, 4, 30, 22, tzinfo=UTC)
    assert options.partitions == (0, 2) and options.concurrency == 8 and options.verify
    assert options.from_time is None and options.to_offsets is None and not options.dry_run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from-offset", "1", "--from-time", "2024-01-01"], "either --from-offset or"),
        (["--to-offset", "1", "--to-time", "2024-01-01"], "either --to-offset or"),
        (["--from-time", "2024-01-02", "--to-time", "2024-01-01"], "later than --from-time"),
        (["--dry-run", "--verify"], "cannot be combined with --verify"),
        (["--concurrency", "0"], "at least 1"),
        (["--partition", "-1"], "non-negative"),
    ],
)
def test_contradictory_options_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BackfillOptions.from_args(_args(*argv))


def test_summary_exit_codes_and_resume_hint() -> None:
    plan = Plan("events", (PartitionRange(0, 0, 10), PartitionRange(1, 5, 20)))
    ok = Summary(plan, False, Counter({Kind.INGESTED: 3, Kind.ALREADY_PRESENT: 20}), 1.0)
    assert ok.exit_code == 0 and ok.done == 23
    text = ok.render()
    assert "ingested" in text and "25 offsets in range" in text and "exit status 0" in text
    assert "total" in text and "23" in text
    skips = Summary(plan, False, Counter({Kind.SKIPPED: 2, Kind.ALREADY_FAILED: 1}), 1.0)
    assert skips.exit_code == 0
    dead = Summary(plan, False, Counter({Kind.INGESTED: 1, Kind.DEAD_LETTERED: 1}), 1.0)
    assert dead.exit_code == 1
    problem = Summary(plan, False, Counter({Kind.PROBLEM: 1}), 1.0, problems=["p0/3: gone"])
    assert problem.exit_code == 1 and "problem: p0/3: gone" in problem.render()
    stopped = Summary(
        plan, False, Counter({Kind.INGESTED: 4}), 1.0, interrupted=True, resume={1: 9}
    )
    assert stopped.exit_code == 130
    assert (
        "resume with: fileserver backfill --topic events --from-offset 1:9 --to-offset 1:20"
        in stopped.render()
    )
    dry = Summary(plan, True, Counter({Kind.NEW: 3, Kind.WOULD_DEAD_LETTER: 2}), 1.0)
    assert dry.exit_code == 0 and "dry run (nothing written)" in dry.render()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line_on_a_terminal() -> None:
    tally = Tally()
    tally.add(Kind.INGESTED, 3)
    tally.add(Kind.ALREADY_PRESENT, 7)
    tally.in_flight = 2
    screen = _Terminal()
    progress = Progress(tally, 20, mode="auto", stream=screen, interval_s=5)
    assert progress.mode == "bar"
    progress.draw()
    line = screen.getvalue()
    assert line.startswith("\r\x1b[K") and "\n" not in line
    assert "10/20 50.0%" in line and "ingested 3" in line and "present 7" in line
    assert "in flight 2" in line and "ETA" in line
    progress.clear()
    assert screen.getvalue().endswith("\r\x1b[K")
    assert Progress(tally, 20, mode="auto", stream=io.StringIO(), interval_s=5).mode == "log"
    paused = Progress(
        tally, 20, mode="log", stream=io.StringIO(), interval_s=5, status=lambda: "s3"
    )
    assert paused.line().endswith("| in flight 2 | paused: s3")


def test_progress_logs_periodically_when_not_on_a_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tally = Tally()
    tally.add(Kind.SKIPPED, 4)
    progress = Progress(tally, 8, mode="log", stream=io.StringIO(), interval_s=0.01)

    async def run_briefly() -> None:
        task = asyncio.create_task(progress.run())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="fileserver.backfill"):
        asyncio.run(run_briefly())
    lines = [r.getMessage() for r in caplog.records if r.name == "fileserver.backfill"]
    assert len(lines) >= 2
    assert all(line.startswith("progress 4/8 50.0%") and "skipped 4" in line for line in lines)
