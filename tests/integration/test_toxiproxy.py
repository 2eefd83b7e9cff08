"""The fault-injection infrastructure, with real traffic: Toxiproxy in front of Kafka, S3,
Postgres and a sample source. Each component works through its proxy, and a toxic (or a
cut link) really breaks it. Timings are lower bounds only, never exact.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from botocore.config import Config
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError
from sqlalchemy.engine import make_url

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.servers import kafka_check, port_open
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.conftest import FaultyStack
from tests.helpers import count, query, read_all, stop_process, tail, wait_until
from tests.servers.toxiproxy import (
    TOXIPROXY_VERSION,
    Proxy,
    Toxiproxy,
    ensure_toxiproxy,
    start_toxiproxy,
)

pytestmark = pytest.mark.kafka


def _s3(config: StackConfig) -> Any:
    """boto3 on the config's endpoint without retries, so one fault is one error."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        aws_access_key_id=config.s3_access_key,
        aws_secret_access_key=config.s3_secret_key,
        region_name=config.s3_region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=5),
    )


def _pg_conninfo(database_url: str) -> str:
    url = make_url(database_url)
    return psycopg.conninfo.make_conninfo(
        host=url.host or "", port=str(url.port), user=url.username or "", dbname=url.database
    )


# --------------------------------------------------------------------------- the server


def test_server_builds_once_and_stops_by_pid_even_on_failure(tmp_path: Path) -> None:
    binary = ensure_toxiproxy()
    started = time.monotonic()
    assert ensure_toxiproxy() == binary  # reused, not rebuilt
    assert time.monotonic() - started < 1.0
    pid = port = None
    with pytest.raises(RuntimeError, match="boom"), start_toxiproxy(tmp_path) as api:
        assert api.server is not None
        pid, port = api.server.pid, api.server.port
        assert api.version() == TOXIPROXY_VERSION
        raise RuntimeError("boom")
    assert pid is not None and port is not None
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert not port_open(port)


def test_missing_go_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILESERVER_TOXIPROXY_BIN", str(tmp_path / "none" / "server"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"Go \(`go`\) is needed"):
        ensure_toxiproxy()


def test_client_api(toxiproxy: Toxiproxy, sample_server: SampleServer) -> None:
    proxy = toxiproxy.create_proxy("api-check", upstream=f"127.0.0.1:{sample_server.port}")
    try:
        assert proxy.port > 0 and toxiproxy.get_proxy("api-check").listen == proxy.listen
        with proxy.toxic("latency", {"latency": 50}, stream="upstream") as toxic:
            assert toxic.name == "latency_upstream" and toxic.attributes["latency"] == 50
            assert [t.name for t in proxy.toxics()] == ["latency_upstream"]
        assert proxy.toxics() == []
        proxy.add_toxic("bandwidth", {"rate": 10}, toxicity=0.5, name="slow")
        proxy.disable()
        assert not toxiproxy.get_proxy("api-check").enabled
        toxiproxy.reset()  # enables every proxy and drops every toxic
        assert toxiproxy.get_proxy("api-check").enabled and proxy.toxics() == []
    finally:
        proxy.delete()
    assert "api-check" not in toxiproxy.proxies()


# --------------------------------------------------------------------------- Kafka


async def test_kafka_through_its_proxy(faulty_stack: FaultyStack) -> None:
    stack = faulty_stack
    boot = stack.config.kafka_bootstrap
    assert boot == stack.kafka.listen != stack.direct.kafka_bootstrap
    # The broker advertises the proxy, so connections after the bootstrap use it too.
    cluster = await kafka_check(boot)
    assert {(b["host"], b["port"]) for b in cluster["brokers"]} == {
        (stack.kafka.host, stack.kafka.port)
    }
    await publish(boot, stack.config.topic, [b"one", b"two"])
    assert [r.value for r in await read_all(boot, stack.config.topic)] == [b"one", b"two"]

    with stack.kafka.toxic("latency", {"latency": 400}):
        started = time.monotonic()
        await publish(boot, stack.config.topic, [b"slow"])
        assert time.monotonic() - started >= 0.4

    stack.kafka.disable()
    producer = AIOKafkaProducer(bootstrap_servers=boot, request_timeout_ms=3000)
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), 30)
    finally:
        await producer.stop()
    stack.kafka.enable()
    records = await read_all(stack.direct.kafka_bootstrap, stack.config.topic)
    assert [r.value for r in records] == [b"one", b"two", b"slow"]

    # Left behind on purpose: the fixture removes it (see the last test).
    stack.kafka.add_toxic("timeout", {"timeout": 0})


# --------------------------------------------------------------------------- S3


def test_s3_through_its_proxy(faulty_stack: FaultyStack) -> None:
    stack = faulty_stack
    assert stack.config.s3_endpoint_url == f"http://{stack.s3.listen}"
    s3 = _s3(stack.config)
    bucket = stack.config.bucket
    s3.put_object(Bucket=bucket, Key="a.mp3", Body=b"x" * 5000)
    assert s3.get_object(Bucket=bucket, Key="a.mp3")["Body"].read() == b"x" * 5000

    with stack.s3.toxic("reset_peer", {"timeout": 0}), pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="b.mp3", Body=b"y" * 5000)
    with stack.s3.toxic("latency", {"latency": 300}):
        started = time.monotonic()
        s3.head_object(Bucket=bucket, Key="a.mp3")
        assert time.monotonic() - started >= 0.3
    with stack.s3.disabled(), pytest.raises(EndpointConnectionError):
        s3.list_objects_v2(Bucket=bucket)
    keys = [o["Key"] for o in _s3(stack.direct).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a.mp3"]  # the reset PUT never landed


# --------------------------------------------------------------------------- Postgres


def test_postgres_through_its_proxy(faulty_stack: FaultyStack) -> None:
    stack = faulty_stack
    assert make_url(stack.config.database_url).port == stack.postgres.port
    # The migrated database, through SQLAlchemy with the proxied URL as the worker uses it.
    assert query(stack.config.database_url, "SELECT count(*) FROM recordings")[0][0] == 0
    conninfo = _pg_conninfo(stack.config.database_url)
    with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        # A blackhole: the query goes out, no answer comes back, the connection stays open.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stack.postgres.add_toxic("timeout", {"timeout": 0})
            hanging = pool.submit(lambda: conn.execute("SELECT 1").fetchone())
            with pytest.raises(concurrent.futures.TimeoutError):
                hanging.result(timeout=1.5)  # the client-side timeout
            assert not hanging.done()
            # Removing a timeout toxic closes the connections it held.
            stack.postgres.remove_toxic("timeout_downstream")
            with pytest.raises(psycopg.OperationalError):
                hanging.result(timeout=10)

    with stack.postgres.disabled():
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo, connect_timeout=5)
        assert time.monotonic() - started < 5  # refused at once, not a timeout
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- a source


def test_source_through_its_proxy(faulty_stack: FaultyStack, sample_server: SampleServer) -> None:
    src = faulty_stack.proxy_source(sample_server)
    body = os.urandom(100_000)
    sample_server.files["/a.mp3"] = body
    assert src.base_url == f"http://{src.allowed}" != sample_server.base_url
    with httpx.Client(timeout=10, trust_env=False) as http:
        assert http.get(src.url("/a.mp3")).content == body
        assert sample_server.hits["/a.mp3"] == 1
        with src.proxy.toxic("latency", {"latency": 300}):
            started = time.monotonic()
            assert http.get(src.url("/a.mp3")).content == body
            assert time.monotonic() - started >= 0.3
        with src.proxy.toxic("bandwidth", {"rate": 100}):  # KB/s: 100 KB take about 1 s
            started = time.monotonic()
            assert http.get(src.url("/a.mp3")).content == body
            assert time.monotonic() - started >= 0.5
        with src.proxy.toxic("slicer", {"average_size": 200, "size_variation": 100, "delay": 50}):
            assert http.get(src.url("/a.mp3")).content == body  # fragmented, still whole
        with (
            src.proxy.toxic("limit_data", {"bytes": 10_000}),
            pytest.raises(httpx.RemoteProtocolError),
        ):
            http.get(src.url("/a.mp3"))  # cut off mid-body
        assert http.get(src.url("/a.mp3")).content == body


# --------------------------------------------------------------------------- a worker


def test_worker_runs_through_every_proxy(
    faulty_stack: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack = faulty_stack
    src = stack.proxy_source(sample_server)
    config = stack.config.with_names(allowed_sources=(src.allowed,))  # only via the proxy
    clip, path = make_mp3(1.0), "/room_1_user_14_1569569697.mp3"
    sample_server.files[path] = clip
    for proxy in stack.proxies:
        proxy.add_toxic("latency", {"latency": 20, "jitter": 10})
    asyncio.run(publish(config.kafka_bootstrap, config.topic, [talk_event(src.url(path))]))
    log = tmp_path / "worker.log"
    worker = start_worker(config, log_path=log)
    try:
        wait_until(
            lambda: count(stack.direct.database_url, "recordings") == 1,
            timeout=90,
            what=f"one recording\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    row = query(stack.direct.database_url, "SELECT source_url, s3_key FROM recordings")[0]
    assert row.source_url.startswith(src.base_url)
    obj = _s3(stack.direct).get_object(Bucket=config.bucket, Key=row.s3_key)
    assert obj["Body"].read() == clip


# --------------------------------------------------------------------------- clean-up


def test_previous_tests_left_no_toxics_or_proxies(
    faulty_stack: FaultyStack, kafka_proxy: Proxy
) -> None:
    """Earlier tests left toxics and proxy_source proxies behind; the fixture removed them."""
    assert kafka_proxy.toxics() == [] and faulty_stack.toxiproxy.get_proxy("kafka").enabled
    names = set(faulty_stack.toxiproxy.proxies())
    assert names == {"kafka", faulty_stack.s3.name, faulty_stack.postgres.name}
    assert all(p.toxics() == [] for p in faulty_stack.proxies)
