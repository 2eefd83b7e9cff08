"""Backfill planning (I/O): resolve times to offsets and snapshot the end offsets."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from fileserver.backfill.options import BackfillOptions
from fileserver.backfill.ranges import Plan, build_plan, select_partitions, to_millis
from fileserver.errors import ConfigError


async def _topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    # Listing every topic first never auto-creates a mistyped one.
    if topic not in await consumer.topics():
        raise ConfigError(f"topic {topic!r} does not exist (set FILESERVER_TOPIC or --topic)")
    # aiokafka has no public call that loads one topic's partitions into the client.
    await consumer._client.add_topic(topic)
    partitions = set(consumer.partitions_for_topic(topic) or ())
    if not partitions:
        raise ConfigError(f"topic {topic!r} has no partitions in the broker's metadata")
    return partitions


async def resolve_plan(consumer: AIOKafkaConsumer, topic: str, options: BackfillOptions) -> Plan:
    """Resolve times to offsets and snapshot the end offsets: the run's fixed range."""
    available = await _topic_partitions(consumer, topic)
    selected = select_partitions(
        available, options.partitions, options.from_offsets, options.to_offsets, topic=topic
    )
    tps = [TopicPartition(topic, p) for p in selected]
    async with asyncio.timeout(60):
        beginning = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
        end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        starts: dict[int, int | None] = {p: None for p in selected}
        stops: dict[int, int | None] = {p: None for p in selected}
        if options.from_time is not None:
            millis = to_millis(options.from_time)
            found = await consumer.offsets_for_times({tp: millis for tp in tps})
            for tp in tps:  # no record at or after that time: nothing to replay there
                hit = found.get(tp)
                starts[tp.partition] = hit.offset if hit is not None else end[tp.partition]
        elif options.from_offsets is not None:
            starts = {p: options.from_offsets.get(p) for p in selected}
        if options.to_time is not None:
            millis = to_millis(options.to_time)
            found = await consumer.offsets_for_times({tp: millis for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                stops[tp.partition] = hit.offset if hit is not None else None
        elif options.to_offsets is not None:
            stops = {p: options.to_offsets.get(p) for p in selected}
    return build_plan(topic, selected, beginning=beginning, end=end, starts=starts, stops=stops)
