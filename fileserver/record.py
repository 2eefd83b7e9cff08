"""A Kafka record as the pipeline sees it, independent of faust or aiokafka. No I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceRecord:
    """One record read from the events topic."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp_ms: int | None = None
    #: ``fileserver redrive`` re-running this position's dead letter on purpose; any
    #: other delivery of a position that already has a failure row ends there.
    redrive: bool = False

    @property
    def source(self) -> str:
        """``topic/partition/offset``: where the record was read."""
        return f"{self.topic}/{self.partition}/{self.offset}"
