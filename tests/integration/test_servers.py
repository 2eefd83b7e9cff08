"""Each server starter for real: start, use with a real client, restart, stop, process gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from fileserver.devstack.servers import (
    ManagedServer,
    ServerStartError,
    create_database,
    create_topics,
    create_topics_async,
    free_port,
    port_open,
    start_postgres,
    start_seaweedfs,
    start_tansu,
)

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """True if the pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def assert_stopped(server: ManagedServer) -> None:
    pid = server.pid
    assert pid is not None
    assert not server.is_running()
    assert wait_gone(pid, 5), f"{server.name} pid {pid} still alive"
    for port in server.ports:
        assert not port_open(port), f"{server.name} port {port} still open"


async def roundtrip(
    bootstrap: str, topic: str, count: int = 5, expect: int | None = None
) -> list[bytes]:
    """Produce ``count`` records, then read ``expect`` (default: count) with a new group."""
    expect = count if expect is None else expect
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                got.extend(r.value for r in records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


def test_free_port_is_bindable_and_unique() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(0 < p < 65536 and not port_open(p) for p in ports)


class NeverReady(ManagedServer):
    def probe(self) -> None:
        raise ConnectionError("not listening")


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    crashing = NeverReady(
        "broken", ["sh", "-c", "echo the-reason-it-failed; exit 3"], workdir=tmp_path
    )
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*the-reason-it-failed"):
        crashing.start(ready_timeout=10)
    assert not crashing.is_running()

    hanging = NeverReady(
        "hanging", ["sh", "-c", "echo still-starting; exec sleep 60"], workdir=tmp_path
    )
    with pytest.raises(ServerStartError, match=r"(?s)not ready in time.*still-starting"):
        hanging.start(ready_timeout=1)
    assert hanging.pid is not None and wait_gone(hanging.pid, 5)


async def test_tansu(tmp_path: Path) -> None:
    with start_tansu(tmp_path / "tansu") as tansu:
        assert tansu.bootstrap == f"127.0.0.1:{tansu.port}"
        await create_topics_async(tansu.bootstrap, ["events", "dlq"], 3)
        await create_topics_async(tansu.bootstrap, ["events"], 3)  # exists already: fine
        assert await roundtrip(tansu.bootstrap, "events") == [f"m{i}".encode() for i in range(5)]
        pid = tansu.pid
        tansu.restart()  # memory storage: same port, data gone
        assert tansu.pid != pid and tansu.is_running()
        create_topics(tansu.bootstrap, ["after-restart"])
    assert_stopped(tansu)
    assert (tmp_path / "tansu" / "tansu.log").read_text().strip()
    tansu.stop()  # idempotent


def test_seaweedfs(tmp_path: Path) -> None:
    with start_seaweedfs(tmp_path / "s3") as s3:
        client = s3.client()
        client.create_bucket(Bucket="recordings")
        client.put_object(Bucket="recordings", Key="a/b.mp3", Body=b"x" * 1000)
        assert client.get_object(Bucket="recordings", Key="a/b.mp3")["Body"].read() == b"x" * 1000

        import boto3
        from botocore.exceptions import ClientError

        wrong = boto3.session.Session().client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id="nobody",
            aws_secret_access_key="wrong",
            region_name=s3.region,
        )
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            wrong.list_buckets()
        with pytest.raises(ClientError, match="NoSuchBucket"):  # no auto-created buckets
            client.put_object(Bucket="missing", Key="k", Body=b"v")

        endpoint, pid = s3.endpoint_url, s3.pid
        s3.stop()
        assert_stopped(s3)
        s3.restart()
        assert s3.endpoint_url == endpoint and s3.pid != pid
        body = s3.client().get_object(Bucket="recordings", Key="a/b.mp3")["Body"].read()
        assert body == b"x" * 1000

        s3.kill()  # a crash loses nothing that was acknowledged
        assert not s3.is_running()
        s3.restart()
        assert s3.client().head_object(Bucket="recordings", Key="a/b.mp3")["ContentLength"] == 1000
    assert_stopped(s3)
    leftovers = [p for p in s3.ports if list(Path("/tmp").glob(f"seaweedfs-*-{p}.sock"))]
    assert leftovers == []


def test_postgres(tmp_path: Path) -> None:
    with start_postgres(tmp_path / "pg") as pg:
        assert pg.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        url = create_database(pg.url, "one_test")
        assert url.endswith("/one_test")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        # chaos tests kill backends over TCP
        victim = psycopg.connect(pg.dsn.replace("dbname=postgres", "dbname=one_test"))
        victim_pid = victim.info.backend_pid
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", [victim_pid]).fetchone() == (
                True,
            )
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        victim.close()

        # a fresh database again under the same name
        assert create_database(url.replace("/one_test", "/postgres"), "one_test") == url
        engine.dispose()
        with sa.create_engine(url).connect() as conn:
            assert (
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_tables WHERE tablename='t'")
                ).scalar_one()
                == 0
            )
            conn.execute(sa.text("CREATE TABLE kept (x int)"))
            conn.commit()

        pg.kill()
        pg.restart()
        with sa.create_engine(url).connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM kept")).scalar_one() == 0
    assert_stopped(pg)


@pytest.mark.kafka
async def test_apache_kafka(tmp_path: Path) -> None:
    from tests.servers.kafka import KAFKA_VERSION, start_kafka

    with start_kafka(tmp_path / "kafka") as kafka:
        await create_topics_async(kafka.bootstrap, ["events"], 3)
        await create_topics_async(kafka.bootstrap, ["events"], 3)
        assert await roundtrip(kafka.bootstrap, "events") == [f"m{i}".encode() for i in range(5)]
        kafka.kill()
        kafka.restart()  # same ports, data kept
        got = await roundtrip(kafka.bootstrap, "events", count=1, expect=6)
        assert sorted(got) == sorted([f"m{i}".encode() for i in range(5)] + [b"m0"])
        log_text = (tmp_path / "kafka" / "kafka.log").read_text()
        assert f"Kafka version: {KAFKA_VERSION}" in log_text
    assert_stopped(kafka)


CHILD = """
import json, os, sys, time
from pathlib import Path
from fileserver.devstack.servers import start_postgres, start_tansu
work = Path(sys.argv[1])
servers = [start_tansu(work / "tansu"), start_postgres(work / "pg")]
print(json.dumps([s.pid for s in servers]), flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_orphans_when_the_parent_goes(tmp_path: Path, how: str) -> None:
    """atexit stops servers on a normal exit; the parent-death signal on a SIGKILL."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            str(tmp_path),
            "hang" if how == "sigkill" else "exit",
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    pids = json.loads(line)
    assert all(alive(pid) for pid in pids) or how == "exit"
    if how == "sigkill":
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.stdout.read() == b""  # server logs never reach our stdout
    child.stdout.close()
    for pid in pids:
        assert wait_gone(pid, 20), f"server pid {pid} outlived its parent ({how})"
