"""``Backfill`` and the dead-letter breaker, with an in-memory consumer, repository and sink.

The e2e test (tests/e2e/test_backfill.py) runs the command on real servers at
concurrency 1; here several events are in flight when the breaker opens, which is where
the resume offset and "no new event starts" are easy to get wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from aiokafka import TopicPartition

from fileserver.backfill import (
    EXIT_BREAKER,
    Backfill,
    BackfillOptions,
    Held,
    Kind,
    PartitionRange,
    Plan,
    Summary,
    Tally,
)
from fileserver.errors import PermanentError, Reason
from fileserver.pipeline import Outcome, Result
from fileserver.processor import DeadLetterLimit, Health, Processor
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure
from fileserver.runtime import Runtime
from fileserver.settings import Settings

TOPIC = "events"


@dataclass
class _Message:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    timestamp: int = 0


class _Consumer:
    """Serves one partition's records, a few per ``getmany``."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values
        self.position_: int = 0

    def assign(self, tps: list[TopicPartition]) -> None:
        assert tps == [TopicPartition(TOPIC, 0)]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position_ = offset

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[_Message]]:
        await asyncio.sleep(0)
        start, stop = self.position_, min(len(self.values), self.position_ + 3)
        self.position_ = stop
        return {
            TopicPartition(TOPIC, 0): [
                _Message(TOPIC, 0, o, self.values[o]) for o in range(start, stop)
            ]
        }

    async def position(self, tp: TopicPartition) -> int:
        return self.position_

    def pause(self, tp: TopicPartition) -> None:
        pass


class _Repo:
    def __init__(self) -> None:
        self.failures: list[NewFailure] = []

    async def existing_source_urls(self, urls: list[str]) -> set[str]:
        return set()

    async def failed_positions(self, topic: str, positions: Any) -> set[tuple[int, int]]:
        return set()

    async def has_failure(self, topic: str, partition: int, offset: int) -> bool:
        return False

    async def insert_failure(self, row: NewFailure) -> None:
        self.failures.append(row)


class _Sink:
    def __init__(self) -> None:
        self.letters: list[tuple[str, str]] = []

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        self.letters.append((record.source, reason))


def _event(path: str) -> bytes:
    ptt = {"uid": "1", "grp_id": "1", "timestamp": "1569569697", "file_path": path}
    return json.dumps({"msg_type": 1, "ptt_msg": ptt}).encode()


def test_breaker_open_stops_the_run_and_resumes_at_the_first_held_event() -> None:
    # Offsets 0-4 good (done at once), 5-12 a source answering 404 after 10-30 ms (so
    # they fail out of order, 4 at a time), 13-19 good; the breaker opens after 3.
    values = [_event(f"http://src/ok_{i}") for i in range(5)]
    values += [_event(f"http://src/gone_{i}") for i in range(8)]
    values += [_event(f"http://src/ok_{i}") for i in range(5, 12)]
    started: list[int] = []

    async def ingest(record: SourceRecord) -> Result:
        started.append(record.offset)
        if b"gone_" not in (record.value or b""):
            return Result(Outcome.INGESTED, record)
        await asyncio.sleep(0.01 * (1 + record.offset % 3))  # out-of-order failures
        raise PermanentError(Reason.SOURCE_NOT_FOUND, "HTTP 404")

    repo, sink, health = _Repo(), _Sink(), Health()
    processor = Processor(
        ingest,
        repo,  # type: ignore[arg-type]
        sink,
        source_retry_s=1,
        health=health,
        breaker=DeadLetterLimit(3, cooldown_s=3600),
        hold=False,
    )
    runtime = cast(
        Runtime,
        SimpleNamespace(
            settings=Settings(),
            repo=repo,
            dead_letters=sink,
            health=health,
            processor=processor,
        ),
    )
    plan = Plan(TOPIC, (PartitionRange(0, 0, len(values)),))
    tally = Tally()
    backfill = Backfill(runtime, plan, BackfillOptions(), tally, concurrency=4)

    asyncio.run(asyncio.wait_for(backfill.run(_Consumer(values)), timeout=30))

    assert backfill.halted is not None and backfill.halted.reason == "source_not_found"
    assert "FILESERVER_DLQ_MAX_CONSECUTIVE=3" in backfill.halted.detail
    assert len(sink.letters) == len(repo.failures) == 3
    assert {s for s, _ in sink.letters} <= {f"{TOPIC}/0/{o}" for o in range(5, 13)}
    held = [h.offset for h in backfill.held]
    assert {h.reason for h in backfill.held} == {"source_not_found"}
    assert held and all(5 <= o < 13 for o in held)
    # Nothing is started once the breaker opened: no good event after the 404s.
    assert max(started) < 13
    resume = backfill.resume_offsets()
    assert resume == {0: min(held)}
    # Held events are neither done nor errors: every started event is one or the other.
    assert tally.counts == Counter({Kind.INGESTED: 5, Kind.DEAD_LETTERED: 3})
    assert not tally.problems and tally.in_flight == 0
    assert sorted(started) == sorted(
        [*range(5), *(int(s.rsplit("/", 1)[1]) for s, _ in sink.letters), *held]
    )


def test_summary_of_a_run_stopped_by_the_breaker() -> None:
    plan = Plan(TOPIC, (PartitionRange(0, 0, 18),))
    detail = (
        "dead-letter breaker open: 3 consecutive 'source_not_found' failures "
        "(FILESERVER_DLQ_MAX_CONSECUTIVE=3)"
    )
    summary = Summary(
        plan,
        False,
        Counter({Kind.INGESTED: 5, Kind.DEAD_LETTERED: 3}),
        1.0,
        resume={0: 8},
        breaker=detail,
        held=[Held("events", 0, 8, "source_not_found")],
    )
    assert summary.exit_code == EXIT_BREAKER == 4
    text = summary.render()
    assert "stopped by the dead-letter breaker" in text and detail in text
    assert "held (not dead-lettered, redone on resume): events/0/8" in text
    assert "resume with: fileserver backfill --topic events --from-offset 0:8 --to-offset 0:18" in (
        text
    )
    assert "FILESERVER_DLQ_MAX_CONSECUTIVE=0 to dead-letter them all" in text
    assert text.endswith("exit status 4") and "interrupted" not in text
    # Ctrl-C while the events in flight finish: still the breaker's status and command.
    both = Summary(plan, False, Counter(), 1.0, interrupted=True, resume={0: 8}, breaker=detail)
    assert both.exit_code == 4 and "interrupted: in-flight events were abandoned" in both.render()
