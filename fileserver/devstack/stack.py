"""A running set of servers (broker, S3, Postgres) and what the worker needs to use them.

The dev command, the test suite and the benchmark all describe their servers with a
:class:`StackConfig` and prepare them with :func:`prepare` (topics, bucket, schema).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fileserver.settings import Settings


@dataclass(frozen=True)
class StackConfig:
    """Addresses and credentials of one broker, one S3 endpoint and one database."""

    kafka_bootstrap: str
    s3_endpoint_url: str
    s3_access_key: str
    s3_secret_key: str
    database_url: str
    s3_region: str = "us-east-1"
    topic: str = "janus-events"
    dlq_topic: str = "fileserver-dlq"
    group_id: str = "fileserver"
    bucket: str = "ptt-recordings"
    allowed_sources: tuple[str, ...] = ("127.0.0.1",)
    extra: Mapping[str, str] = field(default_factory=dict)

    def with_names(self, **changes: Any) -> StackConfig:
        """A copy with other topic / group / bucket names (one set per test)."""
        return replace(self, **changes)

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment a worker process needs (FILESERVER_* and AWS_*)."""
        env = {
            "FILESERVER_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "FILESERVER_TOPIC": self.topic,
            "FILESERVER_DLQ_TOPIC": self.dlq_topic,
            "FILESERVER_GROUP_ID": self.group_id,
            "FILESERVER_DATABASE_URL": self.database_url,
            "FILESERVER_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "FILESERVER_S3_BUCKET": self.bucket,
            "FILESERVER_S3_REGION": self.s3_region,
            "FILESERVER_ALLOWED_SOURCES": ",".join(self.allowed_sources),
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.s3_region,
        }
        env.update(self.extra)
        env.update(overrides)
        return env

    def settings(self, **overrides: str) -> Settings:
        """Settings for in-process use (tests, benchmark)."""
        return Settings.from_env(self.env(**overrides))

    def s3_client(self) -> Any:
        """A plain boto3 client for checks and set-up."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.s3_access_key,
            aws_secret_access_key=self.s3_secret_key,
            region_name=self.s3_region,
        )


def prepare(stack: StackConfig, *, partitions: int = 1) -> None:
    """Create the topics and the bucket and migrate the database."""
    from fileserver.devstack.servers import create_topics
    from fileserver.migrate import upgrade

    create_topics(stack.kafka_bootstrap, [stack.topic, stack.dlq_topic], partitions)
    s3 = stack.s3_client()
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if stack.bucket not in existing:
        s3.create_bucket(Bucket=stack.bucket)
    upgrade(stack.database_url)


async def publish(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | str | dict[str, Any]],
    *,
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Publish record values (dicts become JSON); returns (partition, offset) of each."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    await producer.start()
    placed: list[tuple[int, int]] = []
    try:
        for value in values:
            if isinstance(value, dict):
                raw = json.dumps(value).encode()
            else:
                raw = value.encode() if isinstance(value, str) else value
            meta = await producer.send_and_wait(topic, raw, partition=partition)
            placed.append((meta.partition, meta.offset))
    finally:
        await producer.stop()
    return placed


def start_verb(
    verb: str, stack: StackConfig, *, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``fileserver <verb>`` as a real child process logging to ``log_path``."""
    env = dict(os.environ)
    env.update(stack.env())
    env.update(extra_env or {})
    log = log_path.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fileserver", verb],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()


def start_worker(
    stack: StackConfig, *, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``fileserver worker`` as a real child process logging to ``log_path``."""
    return start_verb("worker", stack, log_path=log_path, extra_env=extra_env)


def start_serve(
    stack: StackConfig, *, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``fileserver serve`` (the read API and the review page); ``extra_env``
    carries its FILESERVER_SERVE_*."""
    return start_verb("serve", stack, log_path=log_path, extra_env=extra_env)
