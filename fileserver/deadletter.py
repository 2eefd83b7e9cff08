"""The dead-letter topic: the original record with the reason in headers, always publishable.

A dead letter must never stall the worker, and two things used to: a record larger than
the producer's ``max_request_size`` (or the topic's ``max.message.bytes``), refused the
same way on every retry, and a send that waits without end (metadata of a missing topic,
a silent broker link). So a letter is cut to fit before it is sent, cut further when the
broker still finds it too large, and every publish has a deadline. A cut letter carries
:data:`HEADER_TRUNCATED`; the original bytes are never lost: the ``ingest_failures`` row
written next (the authoritative list of dead letters) keeps them in ``payload``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from fileserver.errors import DependencyUnavailable
from fileserver.record import SourceRecord
from fileserver.text import storable_utf8

log = logging.getLogger(__name__)

HEADER_REASON = "fileserver-reason"
HEADER_DETAIL = "fileserver-detail"
HEADER_SOURCE = "fileserver-source"
HEADER_TRUNCATED = "fileserver-truncated"
"""Set when the value was cut: the original value's length in bytes (ASCII decimal)."""
HEADER_KEYLESS = "fileserver-keyless"
"""Set when the original record had no key: the letter is keyed by its source position."""
HEADER_KEY_TRUNCATED = "fileserver-key-truncated"
"""Set when the key was cut too (only when the value alone could not make room)."""

MAX_DETAIL_BYTES = 1024
MAX_REASON_BYTES = 64
MAX_SOURCE_BYTES = 512  # topic names are at most 249 characters
DEFAULT_MAX_REQUEST_SIZE = 1048576  # aiokafka's default max_request_size
DEFAULT_DEADLINE_S = 35.0  # the producer's request_timeout_ms (30 s) plus a margin
FALLBACK_RECORD_BYTES = 4096
"""The record budget of the retry after the broker answered "too large"."""
MIN_REQUEST_SIZE = 4096
"""The smallest size limit accepted: bounded headers always fit with room to spare."""

TOO_LARGE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


class DeadLetterSink(Protocol):
    """Where permanently failed records go."""

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None: ...


def dead_letter_headers(record: SourceRecord, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: storable UTF-8, each cut to a bound on a character
    boundary (detail 1 KiB), so headers alone can never make a letter too large."""
    return [
        (HEADER_REASON, storable_utf8(reason, MAX_REASON_BYTES)),
        (HEADER_DETAIL, storable_utf8(detail, MAX_DETAIL_BYTES)),
        (HEADER_SOURCE, storable_utf8(record.source, MAX_SOURCE_BYTES)),
    ]


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """The size aiokafka checks against ``max_request_size`` (its own estimate)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


@dataclass(frozen=True)
class Letter:
    """What is sent to the dead-letter topic for one record."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return record_size(self.key, self.value, self.headers)

    @property
    def truncated(self) -> bool:
        return any(name == HEADER_TRUNCATED for name, _ in self.headers)


def fit_letter(letter: Letter, max_bytes: int) -> Letter:
    """``letter`` with its value (then, only if that is not enough, its key) cut so the
    record is at most ``max_bytes``; unchanged when it fits already.

    The value goes first: the key decides the partition. Each cut adds a header with the
    original length. Shortening a field shrinks the record by at least as many bytes
    (length varints only shrink), so one cut per field is exact. When the headers alone
    exceed ``max_bytes``, the result is the smallest letter: empty value and key.
    """
    if letter.size <= max_bytes:
        return letter
    key, value, headers = letter.key, letter.value, list(letter.headers)
    if value:
        headers.append((HEADER_TRUNCATED, str(len(value)).encode()))
        over = record_size(key, value, headers) - max_bytes
        value = value[: max(0, len(value) - over)]
        if record_size(key, value, headers) <= max_bytes:
            return Letter(key, value, headers)
    if key:
        headers.append((HEADER_KEY_TRUNCATED, str(len(key)).encode()))
        over = record_size(key, value, headers) - max_bytes
        key = key[: max(0, len(key) - over)]
    return Letter(key, value, headers)


class KafkaDeadLetters:
    """Publishes dead letters with an ``acks=all`` producer and waits for each to be durable.

    ``max_request_size`` must be the producer's own (aiokafka refuses larger records
    before sending); ``deadline_s`` bounds one :meth:`publish`, every attempt included,
    and should exceed the producer's ``request_timeout_ms`` so its own errors come first.
    A letter abandoned at the deadline may still reach the broker later, and the retry
    then publishes it again: the dead-letter topic is at-least-once, as before.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        *,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        if max_request_size < MIN_REQUEST_SIZE:
            raise ValueError(f"max_request_size must be >= {MIN_REQUEST_SIZE}")
        if not deadline_s > 0:
            raise ValueError("deadline_s must be > 0")
        self._producer = producer
        self.topic = topic
        self.max_request_size = max_request_size
        self.deadline_s = deadline_s

    def letters(self, record: SourceRecord, reason: str, detail: str) -> list[Letter]:
        """The letters to try in turn while the broker answers "too large": fitted to the
        producer's limit, then to :data:`FALLBACK_RECORD_BYTES`, then the smallest one."""
        # A compacted dead-letter topic refuses keyless records on every try (and aiokafka
        # needs a key or a value): a record without a key is sent keyed by its source
        # position, unique per event, and says so in a header.
        headers = dead_letter_headers(record, reason, detail)
        key = record.key
        if key is None:
            key = record.source.encode()
            headers.append((HEADER_KEYLESS, b"1"))
        original = Letter(key, record.value, headers)
        tries: list[Letter] = []
        for budget in (self.max_request_size, FALLBACK_RECORD_BYTES, 0):
            letter = fit_letter(original, min(budget, self.max_request_size))
            if letter not in tries:
                tries.append(letter)
        return tries

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        """Send the dead letter and wait until the broker has it.

        Raises :class:`DependencyUnavailable` on a Kafka error or when the deadline
        passes; never for a "too large" answer: the letter is cut further instead, and
        if even the smallest letter is refused the failure is logged and publish
        returns (the failure row keeps the record).
        """
        try:
            async with asyncio.timeout(self.deadline_s):
                await self._publish(record, reason, detail)
        except TimeoutError:
            raise DependencyUnavailable(
                "dead-letter topic",
                f"no acknowledgement within {self.deadline_s:g}s (topic {self.topic!r})",
            ) from None

    async def _publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        refused: KafkaError | None = None
        smallest = 0
        for letter in self.letters(record, reason, detail):
            smallest = letter.size
            if refused is not None:
                log.warning(
                    "dead letter of %s refused as too large (%s); retrying with %d bytes",
                    record.source,
                    type(refused).__name__,
                    letter.size,
                )
            try:
                await self._producer.send_and_wait(
                    self.topic, value=letter.value, key=letter.key, headers=letter.headers
                )
                return
            except TOO_LARGE_ERRORS as exc:
                refused = exc
            except KafkaError as exc:
                raise DependencyUnavailable(
                    "dead-letter topic", f"{type(exc).__name__}: {exc} (topic {self.topic!r})"
                ) from None
        log.error(
            "dead letter of %s not published: topic %r refuses even a %d-byte letter (%s); "
            "the ingest_failures row keeps the record",
            record.source,
            self.topic,
            smallest,
            refused,
        )
