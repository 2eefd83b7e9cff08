"""Chaos: real worker processes killed, S3 stopped, Postgres connections killed, a flapping
source. Whatever happens, every good event ends as exactly one row whose object matches
its md5, every bad event as exactly one failure row, and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import TRANSPORT_SETS, count, query, stop_process, tail, wait_until


def _corpus(srv: SampleServer, good: int, rng: random.Random) -> tuple[list[Any], set[str], int]:
    """Good talk events plus a sprinkling of bad ones; returns records, good URLs, bad count."""
    clips = [make_mp3(0.5, freq_hz=200 + 40 * i) for i in range(8)]
    records: list[Any] = []
    urls: set[str] = set()
    bad = 0
    for i in range(good):
        path = f"/c/room_1_user_{i}_{1569569600 + i}.mp3"
        srv.files[path] = clips[i % len(clips)] + bytes([i % 256]) * (i % 3)  # distinct files
        urls.add(srv.url(path))
        records.append(talk_event(srv.url(path), uid=str(i)))
        if i % 10 == 5:
            kind = rng.choice(["json", "event", "404", "audio"])
            records.append(
                {
                    "json": b'{"msg_type": 1, "ptt_msg": ',
                    "event": {"msg_type": 1, "ptt_msg": {"uid": "-1"}},
                    "404": talk_event(srv.url(f"/missing/{i}.mp3")),
                    "audio": talk_event(srv.url("/c/not-audio.mp3")),
                }[kind]
            )
            bad += 1
    srv.files["/c/not-audio.mp3"] = b"<html>error</html>" * 40
    return records, urls, bad


def _verify(stack: StackConfig, urls: set[str], bad: int) -> dict[str, int]:
    rows = query(stack.database_url, "SELECT source_url, md5, s3_key FROM recordings")
    s3 = stack.s3_client()
    mismatched = 0
    for row in rows:
        body = s3.get_object(Bucket=stack.bucket, Key=row.s3_key)["Body"].read()
        mismatched += hashlib.md5(body).hexdigest() != row.md5
    seen = [r.source_url for r in rows]
    failures = query(
        stack.database_url,
        "SELECT kafka_partition, kafka_offset, count(*) FROM ingest_failures "
        "GROUP BY kafka_partition, kafka_offset",
    )
    figures = {
        "rows": len(rows),
        "duplicates": len(seen) - len(set(seen)),
        "missing": len(urls - set(seen)),
        "unexpected": len(set(seen) - urls),
        "object_md5_mismatches": mismatched,
        "failure_rows": sum(f[2] for f in failures),
        "bad_events": bad,
    }
    return figures


def _all_accounted_for(good: int, bad: int) -> dict[str, int]:
    """The figures of a run where nothing was lost, duplicated or corrupted."""
    return {
        "rows": good,
        "duplicates": 0,
        "missing": 0,
        "unexpected": 0,
        "object_md5_mismatches": 0,
        "failure_rows": bad,
        "bad_events": bad,
    }


def _slow_large_recording(srv: SampleServer) -> str:
    """A 2.4 MB recording whose last quarter comes 6 s after the rest: a worker killed
    meanwhile has it half-written in its spool directory (more than 1 MiB goes to disk)."""
    path = "/c/room_1_user_big_1569569999.mp3"
    body = make_mp3(60.0, sample_rate=44100, bitrate_kbps=320)
    srv.files[path] = body

    def slow(req: BaseHTTPRequestHandler) -> bool:
        if req.path != path:
            return False
        req.send_response(200)
        req.send_header("Content-Type", "audio/mpeg")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        try:
            req.wfile.write(body[: len(body) * 3 // 4])
            req.wfile.flush()
            time.sleep(6.0)
            req.wfile.write(body[len(body) * 3 // 4 :])
        except OSError:  # the worker was killed
            pass
        return True

    srv.hooks.append(slow)
    return srv.url(path)


@pytest.mark.parametrize("transports", TRANSPORT_SETS)
def test_repeated_sigkill_during_out_of_order_processing(
    kafka_stack: StackConfig,
    sample_server: SampleServer,
    tmp_path: Path,
    transports: dict[str, str],
) -> None:
    stack, srv = kafka_stack, sample_server
    rng = random.Random(20261128)
    lock = threading.Lock()

    def jitter(req: BaseHTTPRequestHandler) -> bool:  # out-of-order completions
        with lock:
            delay = rng.uniform(0.0, 0.25)
        time.sleep(delay)
        return False

    srv.hooks.append(jitter)
    large = _slow_large_recording(srv)
    records, urls, bad = _corpus(srv, 200, rng)
    records.insert(0, talk_event(large, uid="9999"))  # first: every restart fetches it again
    urls.add(large)
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))
    log = tmp_path / "worker.log"
    spool = tmp_path / "spool"
    env = {"FILESERVER_CONCURRENCY": "16", "FILESERVER_TMP_DIR": str(spool), **transports}
    kills = 0
    for _ in range(6):
        worker = start_worker(stack, log_path=log, extra_env=env)
        time.sleep(rng.uniform(4.0, 8.0))  # start-up, join, then some work
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
    rows_after_kills = count(stack.database_url, "recordings")
    log = tmp_path / "final.log"
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(lambda: "preflight ok" in log.read_text(), timeout=60, what="the final worker")
        wait_until(
            lambda: (
                count(stack.database_url, "recordings") == len(urls)
                and count(stack.database_url, "ingest_failures") == bad
            ),
            timeout=180,
            what=f"the final run to complete\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    figures = _verify(stack, urls, bad)
    print(
        f"\nchaos/sigkill: events={len(records)} good={len(urls)} bad={bad} kills={kills} "
        f"rows_after_kills={rows_after_kills} " + " ".join(f"{k}={v}" for k, v in figures.items())
    )
    assert figures == _all_accounted_for(len(urls), bad)
    assert rows_after_kills > 0, "the killed runs should have made progress"
    # half-written large downloads of killed workers were found and removed by the next
    # worker to start, and the final worker removed its own directory at exit
    logs = (tmp_path / "worker.log").read_text() + log.read_text()
    assert "temporary download file(s) left by a worker that was killed" in logs
    assert list(spool.glob("fileserver-spool-*")) == []  # (faust keeps its data dir here)


def _terminate_backends(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            conn.commit()
        return int(killed)
    finally:
        engine.dispose()


@pytest.mark.parametrize("transports", TRANSPORT_SETS)
def test_s3_outage_postgres_kills_and_a_flapping_source(
    kafka_stack: StackConfig,
    sample_server: SampleServer,
    seaweed: Any,
    tmp_path: Path,
    transports: dict[str, str],
) -> None:
    stack, srv = kafka_stack, sample_server
    rng = random.Random(7)
    lock = threading.Lock()
    flaps = {"503": 0}

    def flapping(req: BaseHTTPRequestHandler) -> bool:
        time.sleep(0.03)
        with lock:
            fail = rng.random() < 0.3
        if not fail:
            return False
        flaps["503"] += 1
        req.send_response(503)
        req.send_header("Retry-After", "0")
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    srv.hooks.append(flapping)
    records, urls, _ = _corpus(srv, 150, rng)
    records = [
        r
        for r in records
        if isinstance(r, dict)
        and "ptt_msg" in r
        and r["ptt_msg"].get("file_path", "").startswith(srv.url("/c/room"))
    ]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))
    log = tmp_path / "worker.log"
    env = {"FILESERVER_CONCURRENCY": "8", "FILESERVER_SOURCE_RETRY_S": "120", **transports}
    worker = start_worker(stack, log_path=log, extra_env=env)
    terminated = 0
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") >= 20,
            timeout=120,
            what=f"first rows\n{tail(log)}",
        )
        seaweed.stop()  # S3 down for a while
        time.sleep(6)
        rows_during_outage = count(stack.database_url, "recordings")
        seaweed.start()
        wait_until(
            lambda: count(stack.database_url, "recordings") >= rows_during_outage + 20,
            timeout=120,
            what=f"progress after S3 is back\n{tail(log)}",
        )
        terminated = _terminate_backends(stack.database_url)
        time.sleep(1)
        terminated += _terminate_backends(stack.database_url)
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(urls),
            timeout=240,
            what=f"all rows\n{tail(log)}",
        )
    finally:
        if not seaweed.is_running():
            seaweed.start()
        assert stop_process(worker) == 0, tail(log)
    figures = _verify(stack, urls, 0)
    text_log = log.read_text()
    print(
        f"\nchaos/outages: events={len(records)} s3_outage_s=6 pg_backends_killed={terminated} "
        f"source_503s={flaps['503']} " + " ".join(f"{k}={v}" for k, v in figures.items())
    )
    assert figures == _all_accounted_for(len(urls), 0)
    assert "pausing intake" in text_log and "resuming intake" in text_log
    assert flaps["503"] > 0
