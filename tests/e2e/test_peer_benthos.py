"""The Benthos peer of ``python -m bench --case peers`` really does the job.

A peer that skipped work (no download, no PUT, no row, errors dropped) would make the
comparison unfair. So the peer binary (built once from ``bench/peers/benthos`` and
cached, see ``bench.peers.ensure_benthos``) runs its pipeline against the suite's Apache
Kafka, SeaweedFS and Postgres: 19 talk events, one whose source answers 404 and a
msg_type 2 record. Every talk event must end as a row whose md5 and size are those of
the source's bytes and whose object holds exactly those bytes; the 404 must end on the
dead-letter topic with its original bytes and a reason; the msg_type 2 record nowhere;
and the group's offsets must be committed to the end once it is done.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from bench.peers import (
    BENTHOS_TABLE,
    BenthosConfig,
    create_benthos_table,
    ensure_benthos,
    start_benthos,
)
from fileserver.devstack.samples import SIGNAL_EVENT, SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish
from tests.helpers import committed_offsets, count, query, read_all, stop_process, tail, wait_until

GOOD = 19
BASE_TS = 1569569600


@pytest.fixture(scope="session")
def benthos_binary() -> Path:
    """The peer binary: built with ``go build`` on first use (minutes when the Go build
    cache is cold), then taken from the user cache."""
    return ensure_benthos()


@pytest.mark.kafka
@pytest.mark.timeout(3600)  # the first build of the peer, on a cold Go cache
def test_benthos_peer_stores_rows_objects_and_dead_letters(
    benthos_binary: Path,
    kafka_stack_3p: StackConfig,
    sample_server: SampleServer,
    tmp_path: Path,
) -> None:
    stack = kafka_stack_3p
    srv = sample_server
    create_benthos_table(stack.database_url)
    files = {
        f"/p/room_1_user_{i}_{BASE_TS + i}.mp3": make_mp3(1.0 + (i % 3) * 0.5, freq_hz=200 + 31 * i)
        for i in range(GOOD)
    }
    srv.files.update(files)
    talk = [
        json.dumps(
            talk_event(srv.url(path), uid=str(i), grp_id="7", timestamp=BASE_TS + i)
        ).encode()
        for i, path in enumerate(files)
    ]
    missing = json.dumps(talk_event(srv.url("/p/missing.mp3"), uid="3", grp_id="7")).encode()
    signal = json.dumps(SIGNAL_EVENT).encode()
    records = [*talk[:5], missing, signal, *talk[5:]]
    placed = asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))

    tuning = BenthosConfig(threads=4, sql_batch_count=8, sql_batch_period="10ms")
    proc = start_benthos(benthos_binary, stack, tuning, tmp_path, "test")
    log = tmp_path / "benthos-test.log"
    try:
        wait_until(
            lambda: count(stack.database_url, BENTHOS_TABLE) == GOOD,
            timeout=120,
            what=f"{GOOD} rows in {BENTHOS_TABLE}\n{tail(log)}",
        )
        letters = wait_until(
            lambda: asyncio.run(read_all(stack.kafka_bootstrap, stack.dlq_topic)),
            timeout=60,
            what=f"a dead letter\n{tail(log)}",
        )
        end = {p: 0 for p in range(3)}
        for partition, offset in placed:
            end[partition] = max(end[partition], offset + 1)
        wait_until(
            lambda: (
                asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))
                == {p: o for p, o in end.items() if o}
            ),
            timeout=30,
            what="the group's offsets committed to the end",
        )
    finally:
        assert stop_process(proc) == 0, tail(log)

    rows = query(
        stack.database_url,
        f"SELECT uid, grp_id, source_url, source_ip, event_time, md5, size_bytes, s3_bucket,"
        f" s3_key, kafka_topic FROM {BENTHOS_TABLE}",
    )
    by_url = {srv.url(path): data for path, data in files.items()}
    assert sorted(r.source_url for r in rows) == sorted(by_url)
    s3 = stack.s3_client()
    for r in rows:
        data = by_url[r.source_url]
        assert (r.md5, r.size_bytes) == (hashlib.md5(data).hexdigest(), len(data))
        assert (r.grp_id, r.source_ip, r.s3_bucket, r.kafka_topic) == (
            7,
            "127.0.0.1",
            stack.bucket,
            stack.topic,
        )
        ts = int(r.source_url.rsplit("_", 1)[1].removesuffix(".mp3"))
        assert r.event_time.timestamp() == ts
        assert r.s3_key == f"7/{r.uid}/2019/09/27/{ts}-{r.md5}.mp3"
        stored = s3.get_object(Bucket=stack.bucket, Key=r.s3_key)
        body = stored["Body"].read()
        assert hashlib.md5(body).hexdigest() == r.md5 and body == data
        assert stored["ContentType"] == "audio/mpeg"
        assert stored["Metadata"]["md5"] == r.md5 and stored["Metadata"]["uid"] == str(r.uid)
    assert srv.hits.get("/p/missing.mp3") == 1  # 404: dead-lettered at once, not retried

    assert len(letters) == 1, [(x.value, x.headers) for x in letters]
    letter = letters[0]
    assert letter.value == missing  # the original bytes, unchanged
    headers = dict(letter.headers)
    assert b"404" in headers["reason"], headers
    assert all(r.source_url != srv.url("/p/missing.mp3") for r in rows)
