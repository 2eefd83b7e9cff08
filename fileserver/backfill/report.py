"""Backfill report: how each record ended (:class:`Kind`), the running :class:`Tally`, its
progress line and the :class:`Summary` printed at the end, with the exit status."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from fileserver import progress
from fileserver.backfill.ranges import Plan
from fileserver.pipeline import Outcome

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_INTERRUPTED = 130
EXIT_BREAKER = 4  # stopped by the dead-letter breaker (FILESERVER_DLQ_MAX_CONSECUTIVE)


class Kind(StrEnum):
    """How one record ended in a backfill (worker outcomes plus backfill-only ones)."""

    INGESTED = Outcome.INGESTED.value
    ALREADY_PRESENT = "already_present"
    REPAIRED_OBJECT = "repaired_object"
    REPAIRED_ROW = "repaired_row"
    SKIPPED = Outcome.SKIPPED.value
    ALREADY_FAILED = "already_failed"
    DEAD_LETTERED = Outcome.DEAD_LETTERED.value
    PROBLEM = "problem"
    ERROR = "error"
    # --dry-run classes
    NEW = "new"
    WOULD_DEAD_LETTER = "would_dead_letter"


FROM_OUTCOME = {
    Outcome.INGESTED: Kind.INGESTED,
    Outcome.DUPLICATE: Kind.ALREADY_PRESENT,
    Outcome.SKIPPED: Kind.SKIPPED,
    Outcome.DEAD_LETTERED: Kind.DEAD_LETTERED,
    Outcome.ALREADY_FAILED: Kind.ALREADY_FAILED,
}

LABELS: dict[Kind, str] = {
    Kind.INGESTED: "ingested",
    Kind.ALREADY_PRESENT: "already present",
    Kind.REPAIRED_OBJECT: "repaired object",
    Kind.REPAIRED_ROW: "repaired row",
    Kind.SKIPPED: "skipped types",
    Kind.ALREADY_FAILED: "already failed",
    Kind.DEAD_LETTERED: "dead-lettered",
    Kind.PROBLEM: "verify problems",
    Kind.ERROR: "errors",
}
DRY_LABELS: dict[Kind, str] = {
    Kind.NEW: "new (would ingest)",
    Kind.ALREADY_PRESENT: "already ingested",
    Kind.SKIPPED: "not a talk event",
    Kind.WOULD_DEAD_LETTER: "invalid (would dead-letter)",
    Kind.ALREADY_FAILED: "already failed",
}
_SHORT = {
    Kind.INGESTED: "ingested",
    Kind.ALREADY_PRESENT: "present",
    Kind.REPAIRED_OBJECT: "repaired",
    Kind.REPAIRED_ROW: "repaired",
    Kind.SKIPPED: "skipped",
    Kind.ALREADY_FAILED: "failed-before",
    Kind.DEAD_LETTERED: "dead",
    Kind.PROBLEM: "problems",
    Kind.ERROR: "errors",
    Kind.NEW: "new",
    Kind.WOULD_DEAD_LETTER: "invalid",
}
_BAD = (Kind.DEAD_LETTERED, Kind.PROBLEM, Kind.ERROR)
_ONLY_IF_ANY = (Kind.REPAIRED_OBJECT, Kind.REPAIRED_ROW, Kind.PROBLEM, Kind.ERROR)
MAX_LISTED = 20


class Held(NamedTuple):
    """An event the dead-letter breaker stopped the run on: not done, redone on resume."""

    topic: str
    partition: int
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset} ({self.reason})"


@dataclass
class Summary:
    """What a backfill run did; :attr:`exit_code` tells success from partial failure."""

    plan: Plan | None
    dry_run: bool
    counts: Counter[Kind]
    elapsed_s: float
    verify: bool = False
    interrupted: bool = False
    error: str | None = None
    resume: dict[int, int] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    breaker: str | None = None  # the breaker's detail when it stopped the run
    held: list[Held] = field(default_factory=list)  # events it stopped on (not done)
    dead_lettered_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0: every record ended as a row or a skip; 1: dead letters or errors; 4: stopped by
        the dead-letter breaker (before 130: it is why the run stopped); 130: interrupted."""
        if self.breaker is not None:
            return EXIT_BREAKER
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.error or any(self.counts[k] for k in _BAD):
            return EXIT_PARTIAL
        return EXIT_OK

    def render(self) -> str:
        """A small table, plus what to run to resume when interrupted."""
        labels = DRY_LABELS if self.dry_run else LABELS
        width = max(len(v) for v in labels.values()) + 2
        title = "dry run (nothing written)" if self.dry_run else "backfill summary"
        rows = [title, "-" * (width + 10)]
        for kind, label in labels.items():
            if kind in _ONLY_IF_ANY and not self.counts[kind]:
                continue
            rows.append(f"{label:<{width}}{self.counts[kind]:>10,}")
            if kind is Kind.DEAD_LETTERED and self.dead_lettered_by_reason:
                by_reason = ", ".join(
                    f"{reason} {n:,}" for reason, n in sorted(self.dead_lettered_by_reason.items())
                )
                rows.append(f"  by reason: {by_reason}")
        rows.append("-" * (width + 10))
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        rows.append(f"{'total':<{width}}{self.done:>10,}")
        span = f"{self.plan.total:,} offsets in range; " if self.plan is not None else ""
        rows.append(f"{span}{self.elapsed_s:.1f}s, {rate:,.0f} events/s")
        rows.extend(f"repaired: {line}" for line in self.repairs[:MAX_LISTED])
        rows.extend(f"problem: {line}" for line in self.problems[:MAX_LISTED])
        if len(self.problems) > MAX_LISTED:
            rows.append(f"... and {len(self.problems) - MAX_LISTED} more problems (see the log)")
        if self.error:
            rows.append(f"error: {self.error}")
        if self.breaker is not None:
            rows.append(
                "stopped by the dead-letter breaker: no new events were started"
                + ("" if self.interrupted else ", the events in flight finished")
            )
            rows.append(f"breaker: {self.breaker}")
            rows.extend(
                f"held (not dead-lettered, redone on resume): {held}"
                for held in self.held[:MAX_LISTED]
            )
            if len(self.held) > MAX_LISTED:
                rows.append(f"... and {len(self.held) - MAX_LISTED} more held (see the log)")
        if self.interrupted:
            rows.append("interrupted: in-flight events were abandoned (a later run redoes them)")
        command = self.resume_command()
        if command is not None:
            rows.append(f"resume with: {command}")
        if self.breaker is not None:
            rows.append(
                "to go on: fix the cause, then run the resume command; or run it with "
                "FILESERVER_DLQ_MAX_CONSECUTIVE=0 to dead-letter them all"
            )
        rows.append(f"exit status {self.exit_code}")
        return "\n".join(rows)

    def resume_ranges(self) -> list[tuple[int, int, int]]:
        """``(partition, from_offset, to_offset)`` left to do when the run stopped early
        (interrupted or the breaker); empty when it ran to its end."""
        stopped = self.interrupted or self.breaker is not None
        if not stopped or self.plan is None:
            return []
        stops = {r.partition: r.stop for r in self.plan.ranges}
        return [(p, o, stops[p]) for p, o in sorted(self.resume.items())]

    def resume_command(self) -> str | None:
        """The command that finishes the range, when the run stopped early."""
        ranges = self.resume_ranges()
        if not ranges or self.plan is None:
            return None
        args = " ".join(f"--from-offset {p}:{start}" for p, start, _ in ranges)
        args += " " + " ".join(f"--to-offset {p}:{stop}" for p, _, stop in ranges)
        return f"fileserver backfill --topic {self.plan.topic} {args}"

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` summary's own keys (docs/operations.md, JSON summaries): every
        count of the text table, zeros included, and what the text lists."""
        labels = DRY_LABELS if self.dry_run else LABELS
        plan = self.plan
        resume = self.resume_ranges()
        return {
            "mode": "dry-run" if self.dry_run else "verify" if self.verify else "replay",
            "topic": plan.topic if plan is not None else None,
            "ranges": [
                {"partition": r.partition, "start": r.start, "stop": r.stop, "records": r.size}
                for r in (plan.ranges if plan is not None else ())
            ],
            "offsets_in_range": plan.total if plan is not None else None,
            "notes": list(plan.notes) if plan is not None else [],
            "counts": {kind.value: self.counts[kind] for kind in labels},
            "total": self.done,
            "dead_lettered_by_reason": dict(sorted(self.dead_lettered_by_reason.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "repairs": list(self.repairs),
            "problems": list(self.problems),
            "error": self.error,
            "interrupted": self.interrupted,
            "breaker": self.breaker,
            "held": [h._asdict() for h in self.held],
            "resume": None
            if not resume
            else {
                "command": self.resume_command(),
                "ranges": [
                    {"partition": p, "from_offset": start, "to_offset": stop}
                    for p, start, stop in resume
                ],
            },
        }

    def one_line(self) -> str:
        return " ".join(f"{k.value}={n}" for k, n in sorted(self.counts.items()) if n)


@dataclass
class Tally:
    """Running counts shared by the reader, the tasks and the progress display."""

    counts: Counter[Kind] = field(default_factory=Counter)
    repairs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dead_lettered_by_reason: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: Kind, n: int = 1) -> None:
        self.counts[kind] += n

    def breakdown(self) -> str:
        """The counts per outcome for the progress line (``ingested 3 present 7``)."""
        return " ".join(f"{_SHORT[k]} {n:,}" for k, n in sorted(self.counts.items()) if n)


class Progress(progress.Progress):
    """The backfill's progress line (``backfill 1,234/5,000 ...``; log lines on
    ``fileserver.backfill``)."""

    name = "backfill"
