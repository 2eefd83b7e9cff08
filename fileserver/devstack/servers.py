"""Real local servers on free loopback ports: Tansu (Kafka protocol), SeaweedFS (S3), Postgres.

Each ``start_*`` function spawns the server as a child process bound to 127.0.0.1, writes
its log to a file in the given work directory, and returns once a real client request
succeeds. Every server is stopped at interpreter exit, and (when started from the main
thread on Linux) the child also gets a parent-death signal so that a SIGKILLed parent
leaves no orphans behind.

This module is the one import for callers; the code lives in
:mod:`fileserver.devstack.process` (:class:`ManagedServer`, ports, probes),
:mod:`~fileserver.devstack.kafka` (Kafka-protocol probe and topics),
:mod:`~fileserver.devstack.tansu`, :mod:`~fileserver.devstack.seaweedfs` and
:mod:`~fileserver.devstack.postgres`.
"""

from __future__ import annotations

from fileserver.devstack.kafka import (
    create_topics,
    create_topics_async,
    kafka_check,
    probe_kafka,
)
from fileserver.devstack.postgres import (
    PG_SUPERUSER,
    PG_SYSTEM_USER,
    Postgres,
    create_database,
    start_postgres,
)
from fileserver.devstack.process import (
    LOOPBACK,
    ManagedServer,
    ServerStartError,
    free_port,
    log_tail,
    port_open,
    run_coroutine_sync,
    stop_all,
)
from fileserver.devstack.seaweedfs import SeaweedS3, start_seaweedfs, weed_binary
from fileserver.devstack.tansu import Tansu, start_tansu, tansu_binary

__all__ = [
    "LOOPBACK",
    "PG_SUPERUSER",
    "PG_SYSTEM_USER",
    "ManagedServer",
    "Postgres",
    "SeaweedS3",
    "ServerStartError",
    "Tansu",
    "create_database",
    "create_topics",
    "create_topics_async",
    "free_port",
    "kafka_check",
    "log_tail",
    "port_open",
    "probe_kafka",
    "run_coroutine_sync",
    "start_postgres",
    "start_seaweedfs",
    "start_tansu",
    "stop_all",
    "tansu_binary",
    "weed_binary",
]
