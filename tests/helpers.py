"""Small helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text

T = TypeVar("T")


# The code's defaults (http11 downloads and S3 PUTs: no variable set, as `pip install`
# and the image run) and the other pair still offered as settings (httpx downloads,
# boto3 PUTs): e2e tests run on both. (The aiohttp wire and S3 sender are tested on the
# hostile sources in test_fetch.py/test_hostile_sources.py and on the real S3 servers in
# test_storage.py.)
OTHER_TRANSPORTS = {
    "FILESERVER_HTTP_TRANSPORT": "httpx",
    "FILESERVER_S3_TRANSPORT": "boto3",
}
TRANSPORT_SETS = [
    pytest.param({}, id="defaults-http11-http11"),
    pytest.param(OTHER_TRANSPORTS, id="set-httpx-boto3"),
]


def wait_until(
    check: Callable[[], T], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)
        last = check()
    return last


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    """Run one SQL query and return its rows."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def count(database_url: str, table: str) -> int:
    return int(query(database_url, f"SELECT count(*) FROM {table}")[0][0])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def run_cli(
    env: Mapping[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m fileserver ARGV`` as a process with ``env``: its status, stdout, stderr."""
    return subprocess.run(
        [sys.executable, "-m", "fileserver", *argv],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for assertion messages."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on ``topic`` by partition (Apache Kafka admin API)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def read_all(bootstrap: str, topic: str, timeout_ms: int = 3000) -> list[Any]:
    """Every record currently in ``topic`` (no group, from the beginning)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(timeout_ms=timeout_ms)
            if not batch:
                break
            for msgs in batch.values():
                records.extend(msgs)
        return records
    finally:
        await consumer.stop()


async def group_members(bootstrap: str, group: str) -> int:
    """How many members the consumer group has with an assignment (Apache Kafka admin API)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    except KafkaError:  # the group does not exist yet
        return 0
    finally:
        await admin.close()
    members = 0
    for response in described:
        for entry in response.groups:
            state, members_list = entry[2], entry[5]
            if state == "Stable":
                members += sum(1 for m in members_list if m[-1])
    return members
