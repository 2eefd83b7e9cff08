"""Observability of a real worker process on Apache Kafka + SeaweedFS + Postgres.

The metrics endpoint is scraped during the run (Prometheus text, OpenMetrics and gzip)
and its counters are checked against what happened; /readyz turns 503 with the reason
during an S3 outage (the test's own bucket is deleted) and 200 again after it; every
event outcome is one JSON log line, and so is the partition assignment.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from fileserver.devstack.samples import (
    QUALITY_EVENT,
    SIGNAL_EVENT,
    SampleServer,
    make_mp3,
    talk_event,
)
from fileserver.devstack.servers import free_port
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import count, stop_process, tail, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> tuple[str, Samples]:
    """The /metrics text and its samples keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def fetch(base: str, **headers: str) -> tuple[dict[str, str], bytes]:
    """GET /metrics with these headers: the response headers and the raw body."""
    req = urllib.request.Request(f"{base}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:  # urllib never inflates gzip
        assert resp.status == 200
        return dict(resp.headers.items()), resp.read()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def test_scrape_readiness_and_logs_of_a_real_run(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack, sample_server
    good: dict[str, bytes] = {}
    for i in range(5):
        path = f"/obs/room_1_user_{i}_{1569569600 + i}.mp3"
        good[path] = make_mp3(1.0 + 0.5 * (i % 2), freq_hz=300 + 41 * i)
    srv.files.update(good)
    flaky = next(iter(good))

    def fail_once(req: BaseHTTPRequestHandler) -> bool:
        if req.path != flaky or srv.hits[flaky] > 1:
            return False
        req.send_response(503)
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    srv.hooks.append(fail_once)
    records: list[Any] = [
        talk_event(srv.url(p), uid=str(10 + i), grp_id="5", timestamp=1569569600 + i)
        for i, p in enumerate(good)
    ]
    records += [
        SIGNAL_EVENT,
        QUALITY_EVENT,
        b'{"msg_type": 1, "ptt_msg": {',
        talk_event(srv.url("/obs/gone.mp3"), uid="99"),
    ]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    env = {
        "FILESERVER_METRICS_PORT": str(port),
        "FILESERVER_SOURCE_RETRY_S": "60",
        "FILESERVER_SHUTDOWN_GRACE_S": "5",
    }
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: (
                count(stack.database_url, "recordings") == len(good)
                and count(stack.database_url, "ingest_failures") == 2
            ),
            timeout=120,
            what=f"5 rows and 2 failures\n{tail(log)}",
        )
        # The same talk burst again, once the first is in: recognised before any download.
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, [records[1]]))
        lag = ("fileserver_consumer_lag", (("partition", "0"), ("topic", stack.topic)))
        text, m = wait_until(
            lambda: (
                (r := scrape(base))
                and value(r[1], "fileserver_events_total", outcome="duplicate") == 1
                and r[1].get(lag) == 0
                and r
            ),
            timeout=60,
            what=f"the duplicate counted and the lag at 0\n{tail(log)}",
        )
        sizes = sum(len(data) for data in good.values())
        assert value(m, "fileserver_events_total", outcome="ingested") == 5
        assert value(m, "fileserver_events_total", outcome="skipped") == 2
        assert value(m, "fileserver_events_total", outcome="dead_lettered") == 2
        assert value(m, "fileserver_skipped_events_total", msg_type="2") == 1
        assert value(m, "fileserver_skipped_events_total", msg_type="3") == 1
        assert value(m, "fileserver_dead_letters_total", reason="malformed_json") == 1
        assert value(m, "fileserver_dead_letters_total", reason="source_not_found") == 1
        assert value(m, "fileserver_dead_letters_total", reason="too_large") == 0
        assert value(m, "fileserver_downloaded_bytes_total") == sizes
        assert value(m, "fileserver_uploaded_bytes_total") == sizes
        for stage in ("fetch", "probe", "upload", "record"):
            assert value(m, "fileserver_stage_duration_seconds_count", stage=stage) == 5, stage
        assert value(m, "fileserver_event_duration_seconds_count", outcome="ingested") == 5
        assert value(m, "fileserver_event_duration_seconds_count", outcome="duplicate") == 1
        assert value(m, "fileserver_event_duration_seconds_count", outcome="dead_lettered") == 2
        assert value(m, "fileserver_retries_total", dependency="source") == 1
        assert value(m, "fileserver_retries_total", dependency="s3") == 0
        assert value(m, "fileserver_in_flight_events") == 0
        assert value(m, "fileserver_pending_events") == 0
        assert value(m, "fileserver_intake_paused") == 0
        assert value(m, "fileserver_intake_pauses_total") == 0
        assert value(m, "process_resident_memory_bytes") > 0
        build = [k for k in m if k[0] == "fileserver_build_info"]
        assert len(build) == 1 and m[build[0]] == 1
        assert {"version", "python", "faust", "aiokafka"} == {k for k, _ in build[0][1]}
        # OpenMetrics, as Prometheus asks for it; gzip when the scraper accepts it
        headers, body = fetch(base, Accept="application/openmetrics-text; version=1.0.0")
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.decode().endswith("# EOF\n")
        om = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in openmetrics_families(body.decode())
            for s in f.samples
        }
        assert om[("fileserver_events_total", (("outcome", "ingested"),))] == 5
        assert om[build[0]] == 1
        headers, body = fetch(base, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert b"fileserver_build_info{" in gzip.decompress(body)
        print(f"\n--- scrape of {base}/metrics (fileserver_* lines)\n")
        print("\n".join(line for line in text.splitlines() if "fileserver_" in line))

        assert get_json(f"{base}/healthz") == (200, {"status": "alive"})
        _, ready = wait_until(
            lambda: (r := get_json(f"{base}/readyz"))[0] == 200 and r,
            timeout=30,
            what="ready",
        )
        assert ready["ready"] is True and ready["reason"] is None
        assert ready["checks"] == {"kafka": "ok", "s3": "ok", "postgres": "ok", "intake": "ok"}

        # An S3 outage: the bucket disappears, a new event cannot be stored.
        s3 = stack.s3_client()
        _empty_and_delete_bucket(s3, stack.bucket)
        late = "/obs/room_1_user_50_1569569650.mp3"
        srv.files[late] = make_mp3(1.0, freq_hz=777)
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, [talk_event(srv.url(late))]))
        _, ready = wait_until(
            lambda: (
                (r := get_json(f"{base}/readyz"))[0] == 503
                and r[1]["checks"]["intake"].startswith("paused")
                and r[1]["checks"]["s3"] != "ok"
                and r
            ),
            timeout=60,
            what=f"not ready during the S3 outage\n{tail(log)}",
        )
        assert ready["ready"] is False
        assert stack.bucket in ready["checks"]["s3"] and ready["checks"]["postgres"] == "ok"
        assert "s3" in ready["reason"] and "intake: paused" in ready["reason"]
        print(f"\n--- /readyz during the outage: {json.dumps(ready)}")
        _, m = scrape(base)
        assert value(m, "fileserver_intake_paused") == 1
        assert value(m, "fileserver_intake_pauses_total") == 1
        assert value(m, "fileserver_retries_total", dependency="s3") >= 1
        assert value(m, "fileserver_in_flight_events") == 1
        assert m[lag] == 1  # the held event is not committed

        s3.create_bucket(Bucket=stack.bucket)
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(good) + 1,
            timeout=90,
            what=f"the held event ingested after the outage\n{tail(log)}",
        )
        wait_until(lambda: get_json(f"{base}/readyz")[0] == 200, timeout=30, what="ready again")
        _, m = scrape(base)
        assert value(m, "fileserver_intake_paused") == 0
        assert value(m, "fileserver_intake_pauses_total") == 1
        assert value(m, "fileserver_events_total", outcome="ingested") == 6
    finally:
        assert stop_process(worker) == 0, tail(log)

    # One JSON line per event outcome, with where it was read and what it was.
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    outcomes = [d for d in lines if "outcome" in d]
    by_outcome: dict[str, list[dict[str, Any]]] = {}
    for d in outcomes:
        by_outcome.setdefault(d["outcome"], []).append(d)
    assert {k: len(v) for k, v in by_outcome.items()} == {
        "ingested": 6,
        "duplicate": 1,
        "dead_lettered": 2,
    }
    offsets = [d["offset"] for d in outcomes]
    assert len(offsets) == len(set(offsets)), "more than one line for an event"
    for d in by_outcome["ingested"]:
        assert d["topic"] == stack.topic and d["partition"] == 0
        assert len(d["md5"]) == 32 and d["s3_key"].endswith(f"-{d['md5']}.mp3")
        assert d["duration_ms"] > 900 and d["elapsed_ms"] >= 0
        assert isinstance(d["uid"], int) and isinstance(d["grp_id"], int)
    dead = {d["reason"]: d for d in by_outcome["dead_lettered"]}
    assert set(dead) == {"malformed_json", "source_not_found"}
    assert dead["source_not_found"]["uid"] == 99 and "404" in dead["source_not_found"]["detail"]
    # The assignment, at INFO with the partitions and the group generation.
    (assigned,) = [d for d in lines if d.get("rebalance") == "assigned"]
    assert assigned["level"] == "info" and assigned["partitions"] == [f"{stack.topic}/0"]
    assert assigned["msg"] == f"partitions assigned (generation {assigned['generation']}): " + (
        f"{stack.topic}[0]"
    )
    text = log.read_text()
    assert "\x1b" not in text, "terminal escape codes in a non-terminal log"
    assert stack.s3_secret_key not in text
