"""KafkaDeadLetters against Apache Kafka: oversize letters are cut to fit (producer limit,
then a topic's lower ``max.message.bytes``), normal ones are unchanged, and a topic that
cannot be produced to, a silent or cut broker link (Toxiproxy) or a broker that is gone
ends in DependencyUnavailable by the deadline instead of a hang."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fileserver.deadletter import (
    FALLBACK_RECORD_BYTES,
    HEADER_DETAIL,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_TRUNCATED,
    KafkaDeadLetters,
)
from fileserver.devstack.servers import free_port
from fileserver.errors import DependencyUnavailable
from fileserver.record import SourceRecord

if TYPE_CHECKING:
    from tests.servers.toxiproxy import Proxy

pytestmark = pytest.mark.kafka


def bootstrap_of(kafka: object) -> str:
    return str(kafka.bootstrap)  # type: ignore[attr-defined]


async def create_topic(bootstrap: str, configs: dict[str, str] | None = None) -> str:
    """A fresh one-partition topic with ``configs``; returns its name."""
    name = f"dlq-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=1, replication_factor=1, topic_configs=configs or {})]
        )
        for topic_error in response.topic_errors:
            assert topic_error[1] == 0, f"could not create {name}: {topic_error}"
    finally:
        await admin.close()
    return name


@pytest.fixture
async def producer(kafka: object) -> AsyncIterator[AIOKafkaProducer]:
    """A producer configured like the worker's (runtime.make_producer)."""
    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap_of(kafka), acks="all", request_timeout_ms=30000
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def read_one(bootstrap: str, topic: str) -> Any:
    """The only record of ``topic`` (a consumer allowed to fetch large records)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=10_000)
        records = batch.get(tp, [])
        assert len(records) == 1, f"expected one record in {topic}, got {len(records)}"
        return records[0]
    finally:
        await consumer.stop()


async def test_a_normal_record_is_published_unchanged(
    kafka: object, producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka))
    record = SourceRecord("events", 3, 17, b'{"msg_type": 1, "ip": "\\u0000"}', key=b"key")
    await KafkaDeadLetters(producer, topic).publish(record, "invalid_event", "ip contains NUL")
    got = await read_one(bootstrap_of(kafka), topic)
    assert (got.key, got.value) == (record.key, record.value)
    assert dict(got.headers) == {
        HEADER_REASON: b"invalid_event",
        HEADER_DETAIL: b"ip contains NUL",
        HEADER_SOURCE: b"events/3/17",
    }


async def test_a_1_3_mb_record_is_published_truncated_with_the_header(
    kafka: object, producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka))
    value = bytes(range(256)) * (1_300_000 // 256)
    record = SourceRecord("events", 0, 5, value, key=b"k")
    await KafkaDeadLetters(producer, topic).publish(record, "malformed_json", "\ud800" * 2000)
    got = await read_one(bootstrap_of(kafka), topic)
    headers = dict(got.headers)
    assert headers[HEADER_TRUNCATED] == str(len(value)).encode()
    assert headers[HEADER_REASON] == b"malformed_json"
    assert len(headers[HEADER_DETAIL]) <= 1024
    headers[HEADER_DETAIL].decode("utf-8")  # storable: the surrogates became U+FFFD
    assert got.key == b"k"
    assert value.startswith(got.value)
    assert 1_040_000 < len(got.value) < 1_048_576  # as much as the producer limit allows


async def test_a_topic_with_a_lower_max_message_bytes_still_gets_a_truncated_letter(
    kafka: object, producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka), {"max.message.bytes": "10000"})
    value = b"x" * 1_300_000
    await KafkaDeadLetters(producer, topic).publish(
        SourceRecord("events", 0, 6, value), "too_large", "d"
    )
    got = await read_one(bootstrap_of(kafka), topic)
    assert dict(got.headers)[HEADER_TRUNCATED] == b"1300000"
    assert 0 < len(got.value) < FALLBACK_RECORD_BYTES  # the broker refused the first cut
    assert value.startswith(got.value)


async def test_a_record_that_fits_the_producer_but_not_the_topic_is_cut(
    kafka: object, producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka), {"max.message.bytes": "10000"})
    value = b"y" * 50_000
    await KafkaDeadLetters(producer, topic).publish(SourceRecord("events", 0, 7, value), "r", "d")
    got = await read_one(bootstrap_of(kafka), topic)
    assert dict(got.headers)[HEADER_TRUNCATED] == b"50000"
    assert 0 < len(got.value) < FALLBACK_RECORD_BYTES


@pytest.mark.parametrize("topic", ["bad name!", "x" * 300], ids=["invalid-name", "too-long"])
async def test_a_topic_that_cannot_be_produced_to_ends_at_the_deadline(
    producer: AIOKafkaProducer, topic: str
) -> None:
    # the broker never has metadata for it: aiokafka's send waits for it (no error of
    # its own before request_timeout_ms, 30 s), like a missing topic without auto-create
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        await KafkaDeadLetters(producer, topic, deadline_s=2.0).publish(
            SourceRecord("events", 0, 8, b"{}"), "r", "d"
        )
    assert info.value.dependency == "dead-letter topic"
    assert "no acknowledgement within 2s" in info.value.detail
    assert time.monotonic() - started < 25  # the deadline, not aiokafka's 30 s


async def test_an_unreachable_broker_ends_at_the_deadline() -> None:
    # nothing listens on the port: the producer's send waits for metadata that never
    # comes (start() would fail the same way, so it is not called)
    port = free_port()
    p = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=30000)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as info:
            await KafkaDeadLetters(p, "dlq", deadline_s=2.0).publish(
                SourceRecord("events", 0, 9, b"{}"), "r", "d"
            )
        assert info.value.dependency == "dead-letter topic"
        assert time.monotonic() - started < 25
    finally:
        await p.stop()


@pytest.fixture
async def proxied_producer(kafka_proxy: Proxy) -> AsyncIterator[AIOKafkaProducer]:
    """A worker-like producer that reaches the broker only through Toxiproxy."""
    p = AIOKafkaProducer(bootstrap_servers=kafka_proxy.listen, acks="all", request_timeout_ms=30000)
    await p.start()
    try:
        yield p
    finally:
        kafka_proxy.heal()  # session-wide proxy; removing a timeout toxic frees held sockets
        await p.stop()


async def test_a_silent_broker_link_ends_at_the_deadline(
    kafka: object, kafka_proxy: Proxy, proxied_producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka))
    letters = KafkaDeadLetters(proxied_producer, topic, deadline_s=2.0)
    await letters.publish(SourceRecord("events", 0, 10, b"{}"), "r", "d")  # the link works
    # a blackhole: the produce request goes out, no answer ever comes, the socket stays open
    kafka_proxy.add_toxic("timeout", {"timeout": 0})
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        await letters.publish(SourceRecord("events", 0, 11, b"{}"), "r", "d")
    assert info.value.dependency == "dead-letter topic"
    assert time.monotonic() - started < 25  # the deadline, not aiokafka's 30 s


async def test_a_cut_broker_link_is_an_outage_not_a_hang(
    kafka: object, kafka_proxy: Proxy, proxied_producer: AIOKafkaProducer
) -> None:
    topic = await create_topic(bootstrap_of(kafka))
    letters = KafkaDeadLetters(proxied_producer, topic, deadline_s=3.0)
    await letters.publish(SourceRecord("events", 0, 12, b"{}"), "r", "d")
    kafka_proxy.disable()  # connections closed, new ones refused
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        await letters.publish(SourceRecord("events", 0, 13, b"{}"), "r", "d")
    assert time.monotonic() - started < 25
