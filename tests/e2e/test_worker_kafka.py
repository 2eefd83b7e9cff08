"""End to end on Apache Kafka + SeaweedFS + Postgres: a real worker process.

Events in -> objects + rows or dead letters out; a redelivery adds nothing; and the
SIGKILL test of the delivery guarantee (a slow early event, later ones finishing first).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from fileserver.deadletter import HEADER_DETAIL, HEADER_REASON, HEADER_SOURCE
from fileserver.devstack.samples import (
    QUALITY_EVENT,
    SIGNAL_EVENT,
    SampleServer,
    make_mp3,
    talk_event,
)
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import (
    TRANSPORT_SETS,
    committed_offsets,
    count,
    query,
    read_all,
    stop_process,
    tail,
    wait_until,
)


def _good(server: SampleServer, n: int, *, prefix: str = "g") -> dict[str, bytes]:
    files = {}
    for i in range(n):
        path = f"/{prefix}/room_1_user_{i}_{1569569600 + i}.mp3"
        files[path] = make_mp3(1.0 + (i % 3) * 0.5, freq_hz=200 + 37 * i)
    server.files.update(files)
    return files


@pytest.mark.parametrize("transports", TRANSPORT_SETS)
def test_mixed_batch_ends_as_exact_rows_objects_and_dead_letters(
    kafka_stack: StackConfig,
    sample_server: SampleServer,
    tmp_path: Path,
    transports: dict[str, str],
) -> None:
    stack = kafka_stack
    srv = sample_server
    good = _good(srv, 6)
    records: list[Any] = []
    for i, path in enumerate(good):
        md5 = hashlib.md5(good[path]).hexdigest() if i == 0 else "md5"  # one real sender md5
        uid: int | str = i if i == 1 else str(i)  # one int uid
        records.append(
            talk_event(srv.url(path), uid=uid, grp_id="7", timestamp=1569569600 + i, md5=md5)
        )
    srv.files["/bad/html.mp3"] = b"<html>502 Bad Gateway</html>" * 50
    srv.files["/bad/long.mp3"] = make_mp3(12.0)
    srv.files["/bad/big.mp3"] = make_mp3(2.0) + b"\0" * 400_000
    srv.files["/bad/md5.mp3"] = make_mp3(1.0)

    def unavailable(req: BaseHTTPRequestHandler) -> bool:
        if req.path != "/bad/503.mp3":
            return False
        req.send_response(503)
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    srv.hooks.append(unavailable)
    bad = {
        "malformed_json": b'{"msg_type": 1, "ptt_msg": {',
        "invalid_event": {"msg_type": 1, "ip": "127.0.0.1", "ptt_msg": {"uid": "x"}},
        "source_forbidden": talk_event("http://10.255.0.1/room_1_user_1_1.mp3"),
        "source_not_found": talk_event(srv.url("/bad/missing.mp3")),
        "source_unavailable": talk_event(srv.url("/bad/503.mp3")),
        "too_large": talk_event(srv.url("/bad/big.mp3")),
        "md5_mismatch": talk_event(srv.url("/bad/md5.mp3"), md5="0123456789abcdef0123456789abcdef"),
        "invalid_audio": talk_event(srv.url("/bad/html.mp3")),
        "duration_out_of_range": talk_event(srv.url("/bad/long.mp3")),
    }
    records += [SIGNAL_EVENT, QUALITY_EVENT, *bad.values()]
    placed = asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))
    env = {
        "FILESERVER_MAX_DURATION_S": "10",
        "FILESERVER_MAX_FILE_BYTES": "300000",
        "FILESERVER_SOURCE_RETRY_S": "2",
        **transports,
    }
    log = tmp_path / "worker.log"
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: (
                count(stack.database_url, "recordings") == len(good)
                and count(stack.database_url, "ingest_failures") == len(bad)
            ),
            timeout=120,
            what=f"{len(good)} rows and {len(bad)} failures\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)

    rows = query(
        stack.database_url,
        "SELECT uid, grp_id, m_type, source_url, md5, size_bytes, duration_ms, sample_rate, "
        "channels, s3_bucket, s3_key, kafka_topic, kafka_offset FROM recordings",
    )
    assert {r.source_url for r in rows} == {srv.url(p) for p in good}
    s3 = stack.s3_client()
    by_url = {srv.url(p): data for p, data in good.items()}
    for r in rows:
        data = by_url[r.source_url]
        assert r.md5 == hashlib.md5(data).hexdigest() and r.size_bytes == len(data)
        assert (r.grp_id, r.m_type, r.sample_rate, r.channels) == (7, "ptt", 16000, 1)
        assert 900 < r.duration_ms < 2200
        assert r.s3_bucket == stack.bucket and r.kafka_topic == stack.topic
        assert r.s3_key.startswith(f"7/{r.uid}/2019/09/27/") and r.s3_key.endswith(f"-{r.md5}.mp3")
        obj = s3.get_object(Bucket=stack.bucket, Key=r.s3_key)
        assert obj["Body"].read() == data
        assert obj["Metadata"]["md5"] == r.md5 and obj["Metadata"]["uid"] == str(r.uid)
    offsets_by_reason = {reason: placed[len(good) + 2 + i][1] for i, reason in enumerate(bad)}
    failures = query(
        stack.database_url, "SELECT reason, kafka_offset, payload FROM ingest_failures"
    )
    assert {(f.reason, f.kafka_offset) for f in failures} == set(offsets_by_reason.items())

    letters = asyncio.run(read_all(stack.kafka_bootstrap, stack.dlq_topic))
    assert len(letters) == len(bad)
    for letter in letters:
        headers = dict(letter.headers)
        reason = headers[HEADER_REASON].decode()
        original = bad[reason]
        raw = original if isinstance(original, bytes) else json.dumps(original).encode()
        assert letter.value == raw
        assert headers[HEADER_SOURCE].decode() == f"{stack.topic}/0/{offsets_by_reason[reason]}"
        assert headers[HEADER_DETAIL]

    # Redelivery of everything (a new group reads the topic from the start): nothing new.
    hits_before = dict(srv.hits)
    again = stack.with_names(group_id=stack.group_id + "-replay")
    worker = start_worker(again, log_path=log, extra_env=env)
    try:
        end = len(records)
        wait_until(
            lambda: (
                asyncio.run(
                    committed_offsets(again.kafka_bootstrap, again.group_id, again.topic)
                ).get(0)
                == end
            ),
            timeout=90,
            what=f"the replay group to commit offset {end}\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert count(stack.database_url, "recordings") == len(good)
    assert count(stack.database_url, "ingest_failures") == len(bad)
    assert len(asyncio.run(read_all(stack.kafka_bootstrap, stack.dlq_topic))) == len(bad)
    assert all(srv.hits.get(p) == hits_before.get(p) for p in good), "ingested files re-downloaded"
    # the consumer batched its fetches as configured (FILESERVER_KAFKA_FETCH_*)
    assert "fetch_min_bytes=65536 fetch_max_wait_ms=20" in log.read_text()


def test_sigkill_with_a_slow_early_event_loses_nothing(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    """Offset 0 hangs while 1..N finish; the group must not commit past 0; kill; restart."""
    stack = kafka_stack
    srv = sample_server
    slow_path = "/slow/room_1_user_0_1569569600.mp3"
    srv.files[slow_path] = make_mp3(1.0)
    release = threading.Event()

    def hang(req: BaseHTTPRequestHandler) -> bool:
        if req.path == slow_path and not release.is_set():
            release.wait(timeout=120)
            return True  # drop the connection without an answer
        return False

    srv.hooks.append(hang)
    fast = _good(srv, 20, prefix="fast")
    records = [talk_event(srv.url(slow_path), uid="0")]
    records += [talk_event(srv.url(p), uid=str(i + 1)) for i, p in enumerate(fast)]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))

    log = tmp_path / "worker.log"
    # A long retry budget: the slow event stays in flight, it is not dead-lettered.
    env = {"FILESERVER_SOURCE_RETRY_S": "600", "FILESERVER_FETCH_TIMEOUT_S": "300"}
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(fast),
            timeout=120,
            what=f"the {len(fast)} fast events\n{tail(log)}",
        )
        # Give faust several commit intervals to (wrongly) commit past the slow event.
        import time

        time.sleep(2.0)
        committed = asyncio.run(
            committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic)
        )
        assert committed.get(0, -1) <= 0, f"committed past the in-flight event: {committed}"
        assert srv.hits.get(slow_path, 0) >= 1
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    release.set()

    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(records),
            timeout=120,
            what=f"all {len(records)} rows after the restart\n{tail(log)}",
        )
        wait_until(
            lambda: (
                asyncio.run(
                    committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic)
                ).get(0)
                == len(records)
            ),
            timeout=60,
            what="the final commit",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    urls = [r[0] for r in query(stack.database_url, "SELECT source_url FROM recordings")]
    assert sorted(urls) == sorted(srv.url(p) for p in [slow_path, *fast])
    assert count(stack.database_url, "ingest_failures") == 0
    # Redelivered fast events were recognised without downloading them again.
    assert all(srv.hits[p] == 1 for p in fast)
