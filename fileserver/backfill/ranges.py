"""Backfill ranges (pure, unit-tested): ``--from-offset``/``--to-offset`` values, the
partitions to replay and the plan: one ``[start, stop)`` per partition, clamped to what the
broker holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fileserver.errors import ConfigError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class OffsetSpec:
    """Offsets given on the command line: one for every partition and/or per partition."""

    default: int | None = None
    per_partition: Mapping[int, int] = field(default_factory=dict)

    def get(self, partition: int) -> int | None:
        """The offset asked for ``partition`` (its own, else the all-partitions one)."""
        return self.per_partition.get(partition, self.default)

    @property
    def only_pairs(self) -> bool:
        """Only ``P:N`` pairs were given (no offset for every partition)."""
        return self.default is None and bool(self.per_partition)


def _non_negative(text: str, what: str, option: str, value: str) -> int:
    text = text.strip().replace("_", "")
    if not text.isdigit():
        raise ConfigError(
            f"{option} {value!r}: {what} must be a non-negative integer "
            "(expected N for every partition or PARTITION:N)"
        )
    return int(text)


def parse_offsets(values: Sequence[str], option: str) -> OffsetSpec | None:
    """Parse repeated ``--from-offset``/``--to-offset`` values (``N``, ``P:N``, or commas)."""
    default: int | None = None
    pairs: dict[int, int] = {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise ConfigError(f"{option} {value!r}: empty item")
            if ":" in item:
                part_text, _, offset_text = item.partition(":")
                partition = _non_negative(part_text, "the partition", option, value)
                offset = _non_negative(offset_text, "the offset", option, value)
                if partition in pairs and pairs[partition] != offset:
                    raise ConfigError(
                        f"{option}: partition {partition} given twice "
                        f"({pairs[partition]} and {offset})"
                    )
                pairs[partition] = offset
            else:
                offset = _non_negative(item, "the offset", option, value)
                if default is not None and default != offset:
                    raise ConfigError(
                        f"{option}: two offsets for every partition ({default} and {offset}); "
                        "use PARTITION:N for per-partition offsets"
                    )
                default = offset
    if default is None and not pairs:
        return None
    return OffsetSpec(default, pairs)


def to_millis(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (Kafka's record timestamps)."""
    millis = (moment - _EPOCH) // timedelta(milliseconds=1)
    if millis < 0:
        raise ConfigError(f"{moment.isoformat()} is before 1970")
    return millis


def select_partitions(
    available: Iterable[int],
    requested: Sequence[int],
    from_offsets: OffsetSpec | None = None,
    to_offsets: OffsetSpec | None = None,
    *,
    topic: str = "the topic",
) -> list[int]:
    """The partitions to replay.

    ``--partition`` when given; else the partitions named by ``--from-offset P:N`` pairs
    when only pairs were given; else every partition of the topic.
    """
    existing = sorted(set(available))
    unknown = sorted(set(requested) - set(existing))
    if unknown:
        raise ConfigError(
            f"{topic} has partitions {_list_ints(existing)}; "
            f"--partition {_list_ints(unknown)} does not exist"
        )
    if requested:
        selected = sorted(set(requested))
    elif from_offsets is not None and from_offsets.only_pairs:
        selected = sorted(from_offsets.per_partition)
    else:
        selected = existing
    for option, spec in (("--from-offset", from_offsets), ("--to-offset", to_offsets)):
        if spec is None:
            continue
        outside = sorted(set(spec.per_partition) - set(selected))
        if outside:
            where = "does not exist" if set(outside) - set(existing) else "is not selected"
            raise ConfigError(
                f"{option} names partition {_list_ints(outside)} which {where} "
                f"(replaying {topic} partitions {_list_ints(selected)})"
            )
    return selected


def _list_ints(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class PartitionRange:
    """Offsets ``[start, stop)`` of one partition."""

    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class Plan:
    """What one run replays: a topic and one offset range per partition."""

    topic: str
    ranges: tuple[PartitionRange, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def describe(self) -> str:
        lines = [f"backfill of topic {self.topic}: {self.total} offsets"]
        for r in self.ranges:
            lines.append(
                f"  partition {r.partition}: offsets {r.start} to {r.stop} "
                f"(exclusive, {r.size} records)"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def build_plan(
    topic: str,
    partitions: Sequence[int],
    *,
    beginning: Mapping[int, int],
    end: Mapping[int, int],
    starts: Mapping[int, int | None],
    stops: Mapping[int, int | None],
) -> Plan:
    """Clamp the requested ``[start, stop)`` of each partition to what the broker holds.

    A missing start is the earliest retained offset, a missing stop the end offset
    captured at start-up. A start before the earliest retained offset begins there, a
    stop past the end offset stops there; both are reported as notes.
    """
    ranges: list[PartitionRange] = []
    notes: list[str] = []
    for p in partitions:
        first, last = beginning[p], end[p]
        want_start, want_stop = starts.get(p), stops.get(p)
        start = first if want_start is None else want_start
        stop = last if want_stop is None else want_stop
        if start < first:
            notes.append(
                f"partition {p}: offset {start} is no longer retained; starting at {first}"
            )
            start = first
        if start > last:
            notes.append(f"partition {p}: start {start} is past the end offset {last}")
            start = last
        if stop > last:
            notes.append(
                f"partition {p}: stop {stop} is past the end offset {last} captured at start; "
                f"stopping at {last}"
            )
            stop = last
        stop = max(stop, start)
        ranges.append(PartitionRange(p, start, stop))
    return Plan(topic, tuple(ranges), tuple(notes))
