"""Servers for the test suite: the dev-stack starters plus Apache Kafka (``tests.servers.kafka``).

The Kafka names are loaded lazily so that ``python -m tests.servers.kafka`` runs cleanly.
"""

from __future__ import annotations

from typing import Any

from fileserver.devstack.servers import (
    ManagedServer,
    Postgres,
    SeaweedS3,
    Tansu,
    create_database,
    create_topics,
    create_topics_async,
    free_port,
    start_postgres,
    start_seaweedfs,
    start_tansu,
)

_KAFKA_NAMES = ("KafkaBroker", "ensure_kafka_libs", "start_kafka")

__all__ = [
    "KafkaBroker",
    "ManagedServer",
    "Postgres",
    "SeaweedS3",
    "Tansu",
    "create_database",
    "create_topics",
    "create_topics_async",
    "ensure_kafka_libs",
    "free_port",
    "start_kafka",
    "start_postgres",
    "start_seaweedfs",
    "start_tansu",
]


def __getattr__(name: str) -> Any:
    if name in _KAFKA_NAMES:
        from tests.servers import kafka

        return getattr(kafka, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
