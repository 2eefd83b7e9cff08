"""Kafka-protocol admin helpers for any broker (Tansu here, Apache Kafka in the tests).

A readiness check (:func:`kafka_check`, :func:`probe_kafka`: a broker is listed and every
partition has a leader) and topic creation that checks aiokafka's per-topic error codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from fileserver.devstack.process import LOOPBACK, port_open, run_coroutine_sync


async def kafka_check(bootstrap: str, request_timeout_ms: int = 5000) -> dict[str, Any]:
    """Describe the cluster and every topic with aiokafka's admin client.

    Raises unless a broker is listed and every partition of every topic has a leader.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap.split(","), request_timeout_ms=request_timeout_ms
    )
    try:
        await admin.start()
        cluster: dict[str, Any] = await admin.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError(f"no brokers in metadata: {cluster!r}")
        for topic in await admin.describe_topics():
            leaderless = [p["partition"] for p in topic["partitions"] if p["leader"] < 0]
            if topic["error_code"] or leaderless:
                raise RuntimeError(
                    f"topic {topic['topic']}: error {topic['error_code']}, "
                    f"partitions without a leader {leaderless}"
                )
        return cluster
    finally:
        await admin.close()


def probe_kafka(bootstrap: str, timeout: float = 10.0) -> None:
    """Raise unless a Kafka-protocol broker answers admin requests at ``bootstrap``."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port_open(int(port), host or LOOPBACK):
        raise ConnectionError(f"nothing listening on {bootstrap}")
    run_coroutine_sync(lambda: kafka_check(bootstrap), timeout)


_TOPIC_ALREADY_EXISTS = 36


async def create_topics_async(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create topics on any Kafka-protocol broker; existing ones are fine.

    aiokafka's ``create_topics`` does not raise on per-topic errors, so the error codes
    are checked here. Returns once every partition of every topic has a leader.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
                for n in wanted
            ],
            timeout_ms=int(timeout * 1000),
        )
        for topic_error in response.topic_errors:
            topic, code = topic_error[0], topic_error[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = topic_error[2] if len(topic_error) > 2 else ""
                raise RuntimeError(f"could not create topic {topic!r}: error {code} {message}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(wanted)
            ready = {
                t["topic"]
                for t in described
                if t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
            }
            if ready >= set(wanted):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders: {sorted(set(wanted) - ready)}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Blocking :func:`create_topics_async` (usable inside or outside an event loop)."""
    wanted = list(names)
    run_coroutine_sync(
        lambda: create_topics_async(
            bootstrap, wanted, partitions, replication_factor=replication_factor, timeout=timeout
        ),
        timeout + 5,
    )
