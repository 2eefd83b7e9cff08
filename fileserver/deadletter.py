"""The dead-letter topic: the original record, unchanged, with the reason in headers."""

from __future__ import annotations

from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from fileserver.errors import DependencyUnavailable
from fileserver.record import SourceRecord

HEADER_REASON = "fileserver-reason"
HEADER_DETAIL = "fileserver-detail"
HEADER_SOURCE = "fileserver-source"
MAX_DETAIL_BYTES = 1024


class DeadLetterSink(Protocol):
    """Where permanently failed records go."""

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None: ...


def dead_letter_headers(record: SourceRecord, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """The headers of a dead letter (detail truncated to 1 KiB)."""
    return [
        (HEADER_REASON, reason.encode()),
        (HEADER_DETAIL, detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]),
        (HEADER_SOURCE, record.source.encode()),
    ]


class KafkaDeadLetters:
    """Publishes dead letters with an ``acks=all`` producer and waits for each to be durable."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        """Send the dead letter and wait until the broker has it."""
        try:
            await self._producer.send_and_wait(
                self.topic,
                value=record.value,
                key=record.key,
                headers=dead_letter_headers(record, reason, detail),
            )
        except KafkaError as exc:
            raise DependencyUnavailable(
                "dead-letter topic", f"{type(exc).__name__}: {exc} (topic {self.topic!r})"
            ) from None
