"""Every event ends as one row or one dead letter under network faults and hostile bytes.

A real ``fileserver worker`` process reaches Apache Kafka, SeaweedFS, Postgres and the
gateway through Toxiproxy (``faulty_stack``); the faults are real TCP behaviour: a
Postgres link that goes silent, added latency, connections reset mid-response, a
bandwidth limit. Each scenario ends with rows = good events, no duplicate, every bad
event exactly one failure row, and the worker alive. Tests assert outcomes; the figures
are printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.conftest import FaultyStack, ProxiedSource
from tests.helpers import (
    TRANSPORT_SETS,
    count,
    query,
    read_all,
    stop_process,
    tail,
    wait_until,
)

GOOD_CLIP = make_mp3(0.5)


def _worker_config(faulty: FaultyStack, srv: SampleServer) -> tuple[StackConfig, ProxiedSource]:
    src = faulty.proxy_source(srv)
    return faulty.config.with_names(allowed_sources=(src.allowed,)), src


def _good_events(srv: SampleServer, src: ProxiedSource, n: int, tag: str) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        path = f"/{tag}/room_1_user_{i}_{1569569600 + i}.mp3"
        srv.files[path] = GOOD_CLIP
        events.append(talk_event(src.url(path), uid=i, timestamp=1569569600 + i))
    return events


def _rows(stack: StackConfig) -> list[str]:
    return [r[0] for r in query(stack.database_url, "SELECT source_url FROM recordings")]


def _failures(stack: StackConfig) -> Counter[str]:
    rows = query(stack.database_url, "SELECT reason FROM ingest_failures")
    return Counter(r[0] for r in rows)


def _assert_outcome(
    direct: StackConfig, good: list[dict[str, Any]], bad: Counter[str], what: str
) -> None:
    rows = _rows(direct)
    failures = _failures(direct)
    print(
        f"{what}: events {len(good) + sum(bad.values())}, rows {len(rows)}, "
        f"duplicates {len(rows) - len(set(rows))}, dead letters {dict(failures)}"
    )
    assert sorted(rows) == sorted(e["ptt_msg"]["file_path"] for e in good)
    assert failures == bad


def _run_until_done(
    direct: StackConfig,
    config: StackConfig,
    log: Path,
    expected: int,
    env: dict[str, str] | None = None,
    *,
    during: Any = None,
) -> None:
    """Run a worker until ``expected`` events have a row or a failure row."""
    worker = start_worker(config, log_path=log, extra_env=env)
    try:
        if during is not None:
            during(worker)
        wait_until(
            lambda: (
                (
                    count(direct.database_url, "recordings")
                    + count(direct.database_url, "ingest_failures")
                )
                >= expected
            ),
            timeout=240,
            what=f"{expected} outcomes\n{tail(log)}",
        )
        assert worker.poll() is None, f"the worker died\n{tail(log)}"
    finally:
        assert stop_process(worker, timeout=60) == 0, tail(log)


# --------------------------------------------------------------------------- hostile bytes


def _poison_records(src: ProxiedSource) -> tuple[list[bytes], Counter[str]]:
    """200 records that can never be ingested, and the reasons they must end with."""
    url = src.url("/poison/room_1_user_1_1569569600.mp3")
    base = talk_event(url)
    records: list[bytes] = []
    reasons: Counter[str] = Counter()

    def talk(**changes: Any) -> bytes:
        doc = json.loads(json.dumps(base))
        for key, value in changes.items():
            if key in ("ip",):
                doc[key] = value
            else:
                doc["ptt_msg"][key] = value
        return json.dumps(doc).encode()  # \u0000 and \ud800 travel as JSON escapes

    for i in range(20):  # NUL in each text field the row keeps
        records.append(talk(file_path=f"{url}?n=\u0000{i}"))
        records.append(talk(ip=f"10.0.0.\u0000{i}"))
    for i in range(20):  # lone surrogates
        records.append(talk(m_type=f"ptt\ud800{i}"))
        records.append(talk(file_path=f"{url}?s=\udfff{i}"))
    for i in range(15):  # other control characters
        records.append(talk(m_type=f"ptt\x1b[31m{i}"))
    reasons["invalid_event"] += len(records)
    for i in range(3):  # 1.3 MB malformed records: their dead letters exceed the limit
        records.append(b'{"msg_type": 1, "junk": "' + b"x" * 1_300_000 + f'{i}"'.encode())
    records.append(b"\xff\xfe not utf-8 \x00")
    reasons["malformed_json"] += 4
    return records, reasons


async def _allow_large_records(stack: StackConfig) -> None:
    """The events topic accepts 2 MB records (the dead-letter topic keeps Kafka's 1 MB)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, stack.topic, {"max.message.bytes": "2097152"}
                )
            ]
        )
    finally:
        await admin.close()


async def _publish_raw(stack: StackConfig, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka_bootstrap, acks="all", max_request_size=2_097_152
    )
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(stack.topic, value)
    finally:
        await producer.stop()


def test_poison_records_become_dead_letters_and_never_pause_intake(
    faulty_stack: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    direct = faulty_stack.direct
    config, src = _worker_config(faulty_stack, sample_server)
    poison, reasons = _poison_records(src)
    invalid_run = [json.dumps({"msg_type": 1, "ptt_msg": {"uid": i}}).encode() for i in range(101)]
    reasons["invalid_event"] += len(invalid_run)
    assert sum(reasons.values()) == 200
    good = _good_events(sample_server, src, 60, "good")
    encoded = [json.dumps(e).encode() for e in good]
    # good events before, between and after: none may wait behind a poison record
    values = [
        *encoded[:20],
        *poison[:40],
        *encoded[20:30],
        *invalid_run,
        *encoded[30:40],
        *poison[40:],
        *encoded[40:],
    ]
    asyncio.run(_allow_large_records(direct))
    asyncio.run(_publish_raw(direct, values))
    log = tmp_path / "worker.log"
    env = {"FILESERVER_DLQ_MAX_CONSECUTIVE": "100"}
    _run_until_done(direct, config, log, len(values), env)
    _assert_outcome(direct, good, reasons, "poison")
    text = log.read_text()
    assert "pausing intake" not in text, "a poison record paused intake"
    assert "holding " not in text, "the breaker held a record that can never succeed"
    letters = asyncio.run(read_all(direct.kafka_bootstrap, direct.dlq_topic))
    assert len(letters) == 200, "one dead-letter record per poison record"
    truncated = [
        dict(m.headers).get("fileserver-truncated")
        for m in letters
        if "fileserver-truncated" in dict(m.headers)
    ]
    assert len(truncated) == 3 and all(int(t) > 1_300_000 for t in truncated if t)
    sizes = query(
        direct.database_url,
        "SELECT octet_length(payload) FROM ingest_failures WHERE reason = 'malformed_json' "
        "ORDER BY 1 DESC LIMIT 3",
    )
    assert all(r[0] > 1_300_000 for r in sizes), "the failure row keeps the whole payload"
    print(f"poison: dead-letter records {len(letters)}, truncated {len(truncated)}")


# --------------------------------------------------------------------------- Postgres


def test_a_silent_postgres_link_is_an_outage_not_a_stall(
    faulty_stack: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    """A blackhole (data dropped, no reset) for longer than the statement timeout: the
    worker notices it by its deadline, pauses, and resumes once the link is back."""
    direct = faulty_stack.direct
    config, src = _worker_config(faulty_stack, sample_server)
    good = _good_events(sample_server, src, 80, "pg")
    asyncio.run(publish(direct.kafka_bootstrap, direct.topic, good[:40]))
    log = tmp_path / "worker.log"
    env = {"FILESERVER_DB_STATEMENT_TIMEOUT_S": "3"}
    blackholes = 0

    def fault(worker: Any) -> None:
        nonlocal blackholes
        wait_until(lambda: count(direct.database_url, "recordings") >= 40, timeout=120)
        with faulty_stack.postgres.toxic("timeout", {"timeout": 0}):
            blackholes += 1
            asyncio.run(publish(direct.kafka_bootstrap, direct.topic, good[40:]))
            wait_until(
                lambda: "pausing intake: postgres" in log.read_text(),
                timeout=90,
                what=f"the silent link noticed within its deadline\n{tail(log)}",
            )
            time.sleep(5)  # longer than the statement timeout, still silent
            assert worker.poll() is None
        wait_until(lambda: "resuming intake" in log.read_text(), timeout=90, what=tail(log))

    _run_until_done(direct, config, log, len(good), env, during=fault)
    assert "FILESERVER_DB_STATEMENT_TIMEOUT_S" in log.read_text()
    print(f"postgres blackholes {blackholes}")
    _assert_outcome(direct, good, Counter(), "silent postgres link")


# --------------------------------------------------------------------------- S3 and Kafka


@pytest.mark.parametrize("transports", TRANSPORT_SETS)
def test_s3_and_kafka_latency_resets_and_bandwidth(
    faulty_stack: FaultyStack,
    sample_server: SampleServer,
    tmp_path: Path,
    transports: dict[str, str],
) -> None:
    direct = faulty_stack.direct
    config, src = _worker_config(faulty_stack, sample_server)
    good = _good_events(sample_server, src, 90, "net")
    log = tmp_path / "worker.log"
    faults: Counter[str] = Counter()
    s3, kafka = faulty_stack.s3, faulty_stack.kafka

    def fault(worker: Any) -> None:
        rounds = [
            ("s3 latency", s3, "latency", {"latency": 300, "jitter": 100}, "downstream"),
            ("kafka latency", kafka, "latency", {"latency": 200, "jitter": 50}, "downstream"),
            ("s3 bandwidth", s3, "bandwidth", {"rate": 16}, "upstream"),  # KB/s
            ("kafka bandwidth", kafka, "bandwidth", {"rate": 32}, "downstream"),
            # a response cut after a few bytes, then the connection reset
            ("s3 reset mid-response", s3, "limit_data", {"bytes": 40}, "downstream"),
            ("kafka reset", kafka, "reset_peer", {"timeout": 500}, "downstream"),
        ]
        for i, (what, proxy, kind, attributes, stream) in enumerate(rounds):
            batch = good[i * 15 : (i + 1) * 15]
            with proxy.toxic(kind, attributes, stream=stream):
                faults[what] += 1
                asyncio.run(publish(direct.kafka_bootstrap, direct.topic, batch))
                time.sleep(4)
            assert worker.poll() is None, f"the worker died under {what}\n{tail(log)}"

    _run_until_done(direct, config, log, len(good), transports, during=fault)
    print(f"faults injected {dict(faults)}")
    _assert_outcome(direct, good, Counter(), "s3/kafka faults")
