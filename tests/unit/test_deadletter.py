"""KafkaDeadLetters without a broker: fitting, too-large answers, errors and the deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fileserver.deadletter import (
    FALLBACK_RECORD_BYTES,
    HEADER_DETAIL,
    HEADER_KEY_TRUNCATED,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_TRUNCATED,
    MAX_DETAIL_BYTES,
    KafkaDeadLetters,
    Letter,
    dead_letter_headers,
    fit_letter,
    record_size,
)
from fileserver.errors import DependencyUnavailable
from fileserver.record import SourceRecord

RECORD = SourceRecord("events", 0, 42, b'{"msg_type": 1}', key=b"k")


class FakeProducer:
    """Records each send; answers with the queued outcomes (an exception, "hang" or ok)."""

    def __init__(self, *outcomes: BaseException | str) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, **kwargs: Any) -> None:
        self.sent.append({"topic": topic, **kwargs})
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(outcome, BaseException):
            raise outcome


def sink(producer: FakeProducer, **kwargs: Any) -> KafkaDeadLetters:
    return KafkaDeadLetters(cast(AIOKafkaProducer, producer), "dlq", **kwargs)


def headers_of(sent: dict[str, Any]) -> dict[str, bytes]:
    return dict(sent["headers"])


async def test_a_normal_record_is_sent_unchanged() -> None:
    producer = FakeProducer()
    await sink(producer).publish(RECORD, "invalid_event", "the detail")
    [sent] = producer.sent
    assert sent["value"] == RECORD.value and sent["key"] == RECORD.key
    assert headers_of(sent) == {
        HEADER_REASON: b"invalid_event",
        HEADER_DETAIL: b"the detail",
        HEADER_SOURCE: b"events/0/42",
    }


async def test_an_oversize_record_is_cut_to_the_producer_limit_with_a_header() -> None:
    producer = FakeProducer()
    value = b"v" * 1_300_000
    await sink(producer).publish(SourceRecord("events", 0, 1, value), "too_large", "d")
    [sent] = producer.sent
    headers = headers_of(sent)
    assert headers[HEADER_TRUNCATED] == b"1300000"
    assert value.startswith(sent["value"])
    size = record_size(sent["key"], sent["value"], sent["headers"])
    assert 1048576 - 16 <= size <= 1048576  # as much as fits, not less


async def test_the_limit_is_a_constructor_argument() -> None:
    producer = FakeProducer()
    await sink(producer, max_request_size=10_000).publish(
        SourceRecord("events", 0, 1, b"v" * 20_000), "r", "d"
    )
    [sent] = producer.sent
    assert record_size(sent["key"], sent["value"], sent["headers"]) <= 10_000
    with pytest.raises(ValueError, match="max_request_size"):
        sink(producer, max_request_size=100)
    with pytest.raises(ValueError, match="deadline_s"):
        sink(producer, deadline_s=0)


@pytest.mark.parametrize("error", [MessageSizeTooLargeError, RecordListTooLargeError])
async def test_a_broker_too_large_answer_is_retried_cut_further(
    error: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    producer = FakeProducer(error())
    value = b"v" * 50_000
    await sink(producer).publish(SourceRecord("events", 0, 1, value), "r", "d")
    first, second = producer.sent
    assert first["value"] == value  # fitted the producer limit: unchanged
    assert HEADER_TRUNCATED not in headers_of(first)
    assert headers_of(second)[HEADER_TRUNCATED] == b"50000"
    assert record_size(second["key"], second["value"], second["headers"]) <= FALLBACK_RECORD_BYTES
    assert 0 < len(second["value"]) < FALLBACK_RECORD_BYTES
    assert "refused as too large" in caplog.text


async def test_the_smallest_letter_comes_last_then_publish_gives_up_without_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = FakeProducer(*[MessageSizeTooLargeError()] * 3)
    with caplog.at_level(logging.ERROR, logger="fileserver.deadletter"):
        await sink(producer).publish(SourceRecord("events", 0, 1, b"v" * 50_000), "r", "d")
    first, second, last = (len(sent["value"]) for sent in producer.sent)
    assert first == 50_000 > FALLBACK_RECORD_BYTES > second > last == 0  # last: headers only
    assert "not published" in caplog.text and "ingest_failures" in caplog.text


async def test_a_small_record_refused_as_too_large_is_not_sent_twice_unchanged() -> None:
    producer = FakeProducer(MessageSizeTooLargeError(), MessageSizeTooLargeError())
    await sink(producer).publish(RECORD, "r", "d")
    assert [s["value"] for s in producer.sent] == [RECORD.value, b""]


@pytest.mark.parametrize(
    "error", [KafkaConnectionError("down"), KafkaTimeoutError(), ValueError("x")]
)
async def test_other_kafka_errors_are_an_outage(error: Exception) -> None:
    producer = FakeProducer(error)
    if isinstance(error, ValueError):  # not a Kafka error: a bug, not ours to hide
        with pytest.raises(ValueError):
            await sink(producer).publish(RECORD, "r", "d")
        return
    with pytest.raises(DependencyUnavailable) as info:
        await sink(producer).publish(RECORD, "r", "d")
    assert info.value.dependency == "dead-letter topic"
    assert len(producer.sent) == 1


async def test_a_send_that_never_answers_ends_at_the_deadline() -> None:
    producer = FakeProducer("hang")
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        await sink(producer, deadline_s=0.2).publish(RECORD, "r", "d")
    assert time.monotonic() - started < 5
    assert info.value.dependency == "dead-letter topic"
    assert "no acknowledgement within 0.2s" in info.value.detail


async def test_a_keyless_record_is_keyed_by_its_source_position() -> None:
    # aiokafka refuses a record with neither key nor value (an assertion), and a
    # compacted dead-letter topic refuses every keyless record
    producer = FakeProducer()
    await sink(producer).publish(SourceRecord("events", 0, 1, None), "malformed_json", "d")
    await sink(producer).publish(SourceRecord("events", 0, 2, b"x", key=b"k"), "invalid_event", "d")
    keyless, keyed = producer.sent
    assert keyless["value"] is None and keyless["key"] == b"events/0/1"
    assert ("fileserver-keyless", b"1") in keyless["headers"]
    assert keyed["key"] == b"k"
    assert all(name != "fileserver-keyless" for name, _ in keyed["headers"])


def test_headers_are_bounded_and_storable() -> None:
    detail = ("é" * 500) + "\x00\ud800" + "x" * 5000
    headers = dict(dead_letter_headers(RECORD, "r\ud800", detail))
    assert len(headers[HEADER_DETAIL]) <= MAX_DETAIL_BYTES
    text = headers[HEADER_DETAIL].decode("utf-8")  # cut on a character boundary
    assert text.startswith("é" * 500 + "\ufffd\ufffd")
    assert text.endswith("\u2026")
    assert headers[HEADER_REASON] == "r\ufffd".encode()


def test_headers_cut_on_a_character_boundary() -> None:
    headers = dict(dead_letter_headers(RECORD, "r", "é" * 1000))
    value = headers[HEADER_DETAIL]
    assert len(value) <= MAX_DETAIL_BYTES
    assert value.decode("utf-8") == "é" * 510 + "\u2026"


def test_fit_letter_cuts_the_key_only_when_the_value_is_not_enough() -> None:
    headers = dead_letter_headers(RECORD, "r", "d")
    letter = fit_letter(Letter(b"k" * 9000, b"v" * 100, headers), 4096)
    assert letter.value == b""
    assert letter.key is not None and 0 < len(letter.key) < 4096
    assert dict(letter.headers)[HEADER_KEY_TRUNCATED] == b"9000"
    assert dict(letter.headers)[HEADER_TRUNCATED] == b"100"
    assert letter.size <= 4096


@settings(deadline=None, database=None, max_examples=500)
@given(
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.text(max_size=300),
    st.integers(min_value=0, max_value=8000),
)
def test_fit_letter_properties(
    key: bytes | None, value: bytes | None, detail: str, budget: int
) -> None:
    headers = dead_letter_headers(RECORD, "reason", detail)
    original = Letter(key, value, headers)
    letter = fit_letter(original, budget)
    if original.size <= budget:
        assert letter == original
        return
    minimal = record_size(
        b"" if key is not None else None, b"" if value is not None else None, letter.headers
    )
    assert letter.size <= max(budget, minimal)
    assert (value or b"").startswith(letter.value or b"")
    assert (key or b"").startswith(letter.key or b"")
    if value:
        assert dict(letter.headers)[HEADER_TRUNCATED] == str(len(value)).encode()
    # as much as fits: one more byte of value would not
    if letter.value and letter.value != value:
        assert letter.size > budget - 8
