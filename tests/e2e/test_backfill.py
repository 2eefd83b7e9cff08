"""``fileserver backfill`` on Apache Kafka + SeaweedFS + Postgres.

Seed-format events over three partitions, part of them ingested by a real worker; rows
and objects deleted; replays by time and by offset bring back exactly what is missing,
never a duplicate, never a second dead letter, never touching the live group's
committed offsets; ranges stop at their bounds; a replay beside a live worker ends with
each event once; ``--dry-run`` writes nothing; Ctrl-C stops with a summary that says
how to resume; so does the dead-letter breaker (exit status 4) instead of holding the
run, while payload reasons never stop it; ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from fileserver import exits
from fileserver.backfill import BackfillOptions, Kind, Summary, run_backfill
from fileserver.cli import build_parser
from fileserver.deadletter import HEADER_SOURCE
from fileserver.devstack.samples import (
    QUALITY_EVENT,
    SIGNAL_EVENT,
    SampleServer,
    make_mp3,
    talk_event,
)
from fileserver.devstack.stack import StackConfig, start_worker
from tests.helpers import (
    committed_offsets,
    count,
    query,
    read_all,
    run_cli,
    stop_process,
    tail,
    wait_until,
)

PARTITIONS = 3


@pytest.fixture(autouse=True)
def _aws_env(seaweed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs build their boto3 client from the environment, like the worker."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweed.region)


@dataclass
class Corpus:
    """What was published: good talk events (by URL), the rest by kind, and positions."""

    good: dict[str, bytes] = field(default_factory=dict)  # url -> file
    missing: list[str] = field(default_factory=list)  # talk events whose source is a 404
    malformed: int = 0
    skipped: int = 0
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)  # url -> (p, offset)


def _values(
    srv: SampleServer, corpus: Corpus, tag: str, *, good: int, missing: int, bad: int, skip: int
) -> list[bytes]:
    """Seed-format records, interleaved; the good files are served by ``srv``."""
    values: list[bytes] = []
    for i in range(good):
        path = f"/{tag}/room_1_user_{i}_{1569569600 + i}.mp3"
        data = make_mp3(0.5, freq_hz=150 + 11 * i + sum(map(ord, tag)) % 300)
        srv.files[path] = data
        corpus.good[srv.url(path)] = data
        values.append(
            json.dumps(talk_event(srv.url(path), uid=str(i), timestamp=1569569600 + i)).encode()
        )
    for i in range(missing):
        url = srv.url(f"/{tag}/gone_{i}.mp3")
        corpus.missing.append(url)
        values.insert(7 * i + 3, json.dumps(talk_event(url, uid=str(1000 + i))).encode())
    for i in range(bad):
        values.insert(11 * i + 5, b'{"msg_type": 1, "ptt_msg": {' + str(i).encode())
    corpus.malformed += bad
    for i in range(skip):
        values.insert(5 * i + 1, json.dumps(SIGNAL_EVENT if i % 2 else QUALITY_EVENT).encode())
    corpus.skipped += skip
    return values


async def _publish_at(
    bootstrap: str,
    topic: str,
    values: list[bytes],
    timestamp_ms: int,
    corpus: Corpus | None,
    *,
    partitions: int = PARTITIONS,
) -> list[tuple[int, int]]:
    """Publish round-robin over the partitions with explicit record timestamps."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, value, partition=i % partitions, timestamp_ms=timestamp_ms + i
            )
            for i, value in enumerate(values)
        ]
        metas = [await f for f in futures]
    finally:
        await producer.stop()
    placed = [(m.partition, m.offset) for m in metas]
    if corpus is not None:
        for value, where in zip(values, placed, strict=True):
            try:
                url = json.loads(value)["ptt_msg"]["file_path"]
            except (ValueError, KeyError, TypeError):
                continue
            corpus.positions[url] = where
    return placed


def _publish_now(
    stack: StackConfig, values: list[bytes], corpus: Corpus | None, *, partitions: int
) -> None:
    """Publish ``values`` round-robin over ``partitions``, timestamped from now."""
    now = int(time.time() * 1000)
    asyncio.run(
        _publish_at(stack.kafka_bootstrap, stack.topic, values, now, corpus, partitions=partitions)
    )


def _run(
    stack: StackConfig, *argv: str, env: Mapping[str, str] | None = None, timeout: float = 300
) -> Summary:
    """``fileserver backfill ARGV`` in-process (settings overridden by ``env``); returns
    its summary, or fails the test after ``timeout`` seconds (a run must terminate)."""
    options = BackfillOptions.from_args(build_parser().parse_args(["backfill", *argv]))
    out = io.StringIO()
    run = run_backfill(
        stack.settings(**(env or {})), replace_progress(options), out=out, err=io.StringIO()
    )
    summary = asyncio.run(asyncio.wait_for(run, timeout))
    assert "backfill of topic" in out.getvalue()
    return summary


def replace_progress(options: BackfillOptions) -> BackfillOptions:
    from dataclasses import replace

    return replace(options, progress="log", log_interval_s=0.5)


def _subprocess_env(stack: StackConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(stack.env())
    return env


def _run_process(
    stack: StackConfig, *argv: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``fileserver backfill ARGV`` as a process; killed (and the test failed) after 180 s."""
    return run_cli(_subprocess_env(stack) | dict(env or {}), "backfill", *argv, timeout=180)


def _table(stdout: str) -> dict[str, int]:
    """The summary table printed by the command: label -> count."""
    rows: dict[str, int] = {}
    for line in stdout.splitlines():
        match = re.match(r"(\S.*?) {2,}([\d,]+)$", line.rstrip())
        if match:
            rows[match.group(1)] = int(match.group(2).replace(",", ""))
    return rows


def _counts(summary: Summary) -> dict[Kind, int]:
    return {k: n for k, n in summary.counts.items() if n}


def _groups(stack: StackConfig) -> set[str]:
    async def groups() -> set[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            return {g[0] for g in await admin.list_consumer_groups()}
        finally:
            await admin.close()

    return asyncio.run(groups())


def _worker(stack: StackConfig, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real worker process (its metrics server on a free port)."""
    return start_worker(stack, log_path=log, extra_env={"FILESERVER_METRICS_PORT": "0", **env})


def _alive(proc: subprocess.Popen[bytes], log: Path) -> bool:
    """Fail at once (with its log) when the worker has exited."""
    if proc.poll() is not None:
        raise AssertionError(f"worker exited with {proc.returncode}\n{tail(log)}")
    return True


def _committed(stack: StackConfig) -> dict[int, int]:
    return asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))


def _dead_letter_sources(stack: StackConfig) -> list[str]:
    letters = asyncio.run(read_all(stack.kafka_bootstrap, stack.dlq_topic))
    return [dict(letter.headers)[HEADER_SOURCE].decode() for letter in letters]


def _objects(stack: StackConfig) -> set[str]:
    s3 = stack.s3_client()
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def _rows(stack: StackConfig) -> list[Any]:
    return query(
        stack.database_url,
        "SELECT source_url, md5, s3_key, kafka_partition, kafka_offset FROM recordings",
    )


def _assert_rows_and_objects_match(stack: StackConfig, corpus: Corpus) -> None:
    """Each good event exactly once as a row, its object holding exactly its bytes."""
    rows = _rows(stack)
    assert sorted(r.source_url for r in rows) == sorted(corpus.good)
    s3 = stack.s3_client()
    for r in rows:
        body = s3.get_object(Bucket=stack.bucket, Key=r.s3_key)["Body"].read()
        assert body == corpus.good[r.source_url], r.source_url


def _iso(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat()


def test_replays_bring_back_exactly_what_is_missing(
    kafka_stack_3p: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    db = stack.database_url
    now_ms = int(time.time() * 1000)
    early_ms, late_ms = now_ms - 600_000, now_ms - 300_000
    corpus = Corpus()
    first = _values(srv, corpus, "a", good=120, missing=5, bad=5, skip=20)
    asyncio.run(_publish_at(stack.kafka_bootstrap, stack.topic, first, early_ms, corpus))

    # The live worker ingests the first 150 events, then stops.
    log = tmp_path / "worker.log"
    worker = _worker(stack, log)
    try:
        wait_until(
            lambda: (
                _alive(worker, log)
                and count(db, "recordings") == 120
                and count(db, "ingest_failures") == 10
            ),
            timeout=120,
            what=f"the worker's 120 rows and 10 failures\n{tail(log)}",
        )
        wait_until(
            lambda: sum(_committed(stack).values()) == len(first),
            timeout=60,
            what="the worker's commits",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    live_offsets = _committed(stack)
    groups = _groups(stack)
    assert stack.group_id in groups

    # Then 150 more events, later; and some damage.
    second = _values(srv, corpus, "b", good=120, missing=5, bad=5, skip=20)
    asyncio.run(_publish_at(stack.kafka_bootstrap, stack.topic, second, late_ms, corpus))
    first_urls = [u for u in corpus.good if "/a/" in u]
    rows_deleted = first_urls[:10]
    objects_deleted = first_urls[10:20]
    key_of = {r.source_url: r.s3_key for r in _rows(stack)}
    query_write(db, "DELETE FROM recordings WHERE source_url = ANY(:urls)", urls=rows_deleted)
    s3 = stack.s3_client()
    for url in objects_deleted:
        s3.delete_object(Bucket=stack.bucket, Key=key_of[url])
    objects_before = _objects(stack)

    # --dry-run: counts per class, writes nothing, downloads nothing.
    hits = dict(srv.hits)
    dry = _run(stack, "--dry-run")
    assert _counts(dry) == {
        Kind.ALREADY_PRESENT: 110,
        Kind.NEW: 10 + 120 + 5,
        Kind.SKIPPED: 40,
        Kind.WOULD_DEAD_LETTER: 5,
        Kind.ALREADY_FAILED: 10,
    }
    assert dry.exit_code == 0 and dry.plan is not None and dry.plan.total == 300
    assert srv.hits == hits
    assert (count(db, "recordings"), count(db, "ingest_failures")) == (110, 10)
    assert len(_dead_letter_sources(stack)) == 10
    assert _objects(stack) == objects_before

    # --from-time: only the later events; the rows deleted earlier stay missing.
    by_time = _run(stack, "--from-time", _iso(now_ms - 450_000))
    assert by_time.plan is not None and by_time.plan.total == 150
    assert _counts(by_time) == {Kind.INGESTED: 120, Kind.DEAD_LETTERED: 10, Kind.SKIPPED: 20}
    assert by_time.exit_code == 1  # some dead letters
    present = {r.source_url for r in _rows(stack)}
    assert present == set(corpus.good) - set(rows_deleted)

    # --from-offset 0 as a real process: exactly the 10 deleted rows come back, nothing is
    # downloaded for the events that are present, nothing is dead-lettered twice.
    hits = dict(srv.hits)
    done = _run_process(stack, "--from-offset", "0", "--concurrency", "8", "--progress", "log")
    assert done.returncode == 0, done.stdout + done.stderr
    table = _table(done.stdout)
    assert table["ingested"] == 10 and table["already present"] == 230, done.stdout
    assert table["already failed"] == 20 and table["skipped types"] == 40, done.stdout
    assert table["dead-lettered"] == 0 and table["total"] == 300, done.stdout
    assert "exit status 0" in done.stdout
    downloaded = {p for p, n in srv.hits.items() if n != hits.get(p, 0)}
    assert downloaded == {u.removeprefix(srv.base_url) for u in rows_deleted}
    assert count(db, "recordings") == 240 and count(db, "ingest_failures") == 20
    dead = _dead_letter_sources(stack)
    assert len(dead) == len(set(dead)) == 20
    expected_dead = {
        f"{stack.topic}/{p}/{o}" for p, o in (corpus.positions[u] for u in corpus.missing)
    }
    assert expected_dead <= set(dead)

    # --verify: the missing objects are re-uploaded, a row deleted under a stored object
    # comes back (reported as a repaired row), everything else checks out.
    second_urls = [u for u in corpus.good if "/b/" in u]
    rows_deleted_again = second_urls[:5]
    query_write(db, "DELETE FROM recordings WHERE source_url = ANY(:urls)", urls=rows_deleted_again)
    verified = _run(stack, "--verify", "--concurrency", "8")
    assert _counts(verified) == {
        Kind.REPAIRED_OBJECT: 10,
        Kind.REPAIRED_ROW: 5,
        Kind.ALREADY_PRESENT: 225,
        Kind.SKIPPED: 40,
        Kind.ALREADY_FAILED: 20,
    }, verified.render()
    assert verified.exit_code == 0
    assert len(verified.repairs) == 15
    assert all(any(key_of[u] in line for line in verified.repairs) for u in objects_deleted)
    _assert_rows_and_objects_match(stack, corpus)
    assert count(db, "ingest_failures") == 20 and len(_dead_letter_sources(stack)) == 20

    # The live group is exactly where the worker left it, and no group was added.
    assert _committed(stack) == live_offsets
    assert _groups(stack) == groups


def query_write(database_url: str, sql: str, **params: Any) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def test_a_range_that_ends_before_the_end_stops_at_its_bound(
    kafka_stack_3p: StackConfig, sample_server: SampleServer
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    corpus = Corpus()
    values = _values(srv, corpus, "r", good=60, missing=0, bad=0, skip=0)
    base_ms = int(time.time() * 1000) - 120_000
    # Event i lands on partition i % 3 at offset i // 3 with timestamp base + i ms.
    asyncio.run(_publish_at(stack.kafka_bootstrap, stack.topic, values, base_ms, corpus))

    def positions() -> set[tuple[int, int]]:
        return {(r.kafka_partition, r.kafka_offset) for r in _rows(stack)}

    first = _run(stack, "--to-offset", "5")
    assert first.plan is not None and first.plan.total == 15
    assert _counts(first) == {Kind.INGESTED: 15}
    assert positions() == {(p, o) for p in range(3) for o in range(5)}

    # Only partition 1, [5, 8): the pairs select the partition.
    second = _run(stack, "--from-offset", "1:5", "--to-offset", "1:8")
    assert _counts(second) == {Kind.INGESTED: 3}
    assert positions() == {(p, o) for p in range(3) for o in range(5)} | {(1, 5), (1, 6), (1, 7)}

    # By time on partition 2: offset 10 has timestamp base + 32, offset 12 base + 38.
    third = _run(
        stack,
        "--partition",
        "2",
        "--from-time",
        _iso(base_ms + 3 * 10 + 2),
        "--to-time",
        _iso(base_ms + 3 * 12 + 2),
    )
    assert third.plan is not None
    assert [(r.partition, r.start, r.stop) for r in third.plan.ranges] == [(2, 10, 12)]
    assert _counts(third) == {Kind.INGESTED: 2}
    assert {(2, 10), (2, 11)} <= positions() and (2, 12) not in positions()
    assert count(stack.database_url, "recordings") == 15 + 3 + 2

    # Events published after the start are beyond the captured end: a full replay ends.
    late = _values(srv, Corpus(), "late", good=3, missing=0, bad=0, skip=0)

    async def replay_and_publish() -> Summary:
        options = replace_progress(
            BackfillOptions.from_args(build_parser().parse_args(["backfill"]))
        )
        task = asyncio.create_task(
            run_backfill(stack.settings(), options, out=io.StringIO(), err=io.StringIO())
        )
        await _publish_at(stack.kafka_bootstrap, stack.topic, late, base_ms + 1000, None)
        return await task

    full = asyncio.run(replay_and_publish())
    assert full.plan is not None and not full.interrupted
    assert full.done == full.plan.total
    assert full.counts[Kind.INGESTED] + full.counts[Kind.ALREADY_PRESENT] == full.done


def test_backfill_beside_a_live_worker_ends_with_each_event_once(
    kafka_stack_3p: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    db = stack.database_url

    def slow(req: BaseHTTPRequestHandler) -> bool:
        time.sleep(0.1)  # keeps both processes busy at the same time
        return False

    srv.hooks.append(slow)
    corpus = Corpus()
    values = _values(srv, corpus, "live", good=150, missing=6, bad=6, skip=18)
    asyncio.run(
        _publish_at(stack.kafka_bootstrap, stack.topic, values, int(time.time() * 1000), corpus)
    )
    log = tmp_path / "worker.log"
    worker = _worker(stack, log, FILESERVER_CONCURRENCY="4")
    try:
        wait_until(
            lambda: _alive(worker, log) and count(db, "recordings") >= 10,
            timeout=90,
            what=tail(log),
        )
        backfill = _run_process(stack, "--concurrency", "4", "--progress", "log")
        assert backfill.returncode in (0, 1), backfill.stdout + backfill.stderr
        assert _table(backfill.stdout)["total"] == len(values), backfill.stdout
        wait_until(
            lambda: sum(_committed(stack).values()) == len(values),
            timeout=120,
            what=f"the worker to commit everything\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    _assert_rows_and_objects_match(stack, corpus)
    failures = query(db, "SELECT kafka_partition, kafka_offset FROM ingest_failures")
    bad_positions = {corpus.positions[u] for u in corpus.missing}
    assert len(failures) == 12 and bad_positions <= {tuple(f) for f in failures}
    # Dead letters are at-least-once: a race may repeat one, it never loses one.
    dead = _dead_letter_sources(stack)
    assert {f"{stack.topic}/{p}/{o}" for p, o in failures} == set(dead)


def test_ctrl_c_stops_with_a_summary_and_the_resume_command_finishes(
    kafka_stack_3p: StackConfig, sample_server: SampleServer
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    db = stack.database_url
    corpus = Corpus()
    values = _values(srv, corpus, "int", good=30, missing=0, bad=0, skip=0)
    stuck = "/int/room_1_user_12_1569569612.mp3"  # offset 4 of partition 0
    release = threading.Event()

    def hang(req: BaseHTTPRequestHandler) -> bool:
        if req.path == stuck and not release.is_set():
            release.wait(timeout=60)
            return True
        return False

    srv.hooks.append(hang)
    asyncio.run(
        _publish_at(stack.kafka_bootstrap, stack.topic, values, int(time.time() * 1000), corpus)
    )
    assert corpus.positions[srv.url(stuck)] == (0, 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fileserver", "backfill", "--concurrency", "1", "--progress", "log"],
        env=_subprocess_env(stack) | {"FILESERVER_SOURCE_RETRY_S": "600"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: srv.hits.get(stuck, 0) >= 1, timeout=60, what="the stuck download")
        rows_before = count(db, "recordings")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        release.set()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stdout
    resume = [line for line in stdout.splitlines() if line.startswith("resume with: ")]
    assert len(resume) == 1, stdout
    assert "--from-offset 0:4" in resume[0], resume[0]
    assert count(db, "recordings") == rows_before < 30
    args = resume[0].removeprefix("resume with: fileserver backfill ").split()
    finished = _run(stack, *args)
    assert finished.exit_code == 0
    assert finished.counts[Kind.INGESTED] >= 1
    _assert_rows_and_objects_match(stack, corpus)


def _gone(srv: SampleServer, corpus: Corpus, tag: str, n: int) -> list[bytes]:
    """``n`` talk events whose source answers 404 (``source_not_found``)."""
    values = []
    for i in range(n):
        url = srv.url(f"/{tag}/gone_{i}.mp3")
        corpus.missing.append(url)
        values.append(json.dumps(talk_event(url, uid=str(1000 + i))).encode())
    return values


def test_the_dead_letter_breaker_stops_a_backfill_and_the_resume_command_finishes(
    kafka_stack: StackConfig, sample_server: SampleServer
) -> None:
    """5 good events, 8 whose source answers 404, 5 good, on one partition; the breaker
    at 3 and a cooldown of an hour: a backfill that held would time out here."""
    stack, srv = kafka_stack, sample_server
    db = stack.database_url
    corpus = Corpus()
    values = _values(srv, corpus, "pre", good=5, missing=0, bad=0, skip=0)
    values += _gone(srv, corpus, "brk", 8)
    values += _values(srv, corpus, "post", good=5, missing=0, bad=0, skip=0)
    _publish_now(stack, values, corpus, partitions=1)
    held_offset = 5 + 3  # the 4th 404: the first the breaker would hold
    assert corpus.positions[corpus.missing[3]] == (0, held_offset)

    started = time.monotonic()
    stopped = _run_process(
        stack,
        "--concurrency",
        "1",
        "--progress",
        "log",
        env={"FILESERVER_DLQ_MAX_CONSECUTIVE": "3", "FILESERVER_DLQ_BREAKER_COOLDOWN_S": "3600"},
    )
    output = stopped.stdout + stopped.stderr
    print(stopped.stdout)
    assert time.monotonic() - started < 180  # it returned (subprocess.run would have raised)
    assert stopped.returncode == 4, output
    assert "stopped by the dead-letter breaker" in stopped.stdout, output
    assert (
        "breaker: dead-letter breaker open: 3 consecutive 'source_not_found' failures "
        "(FILESERVER_DLQ_MAX_CONSECUTIVE=3)"
    ) in stopped.stdout, output
    assert f"held (not dead-lettered, redone on resume): {stack.topic}/0/{held_offset}" in (
        stopped.stdout
    )
    assert "FILESERVER_DLQ_MAX_CONSECUTIVE=0 to dead-letter them all" in stopped.stdout
    assert stopped.stdout.rstrip().endswith("exit status 4"), output
    resume = [line for line in stopped.stdout.splitlines() if line.startswith("resume with: ")]
    assert resume == [
        f"resume with: fileserver backfill --topic {stack.topic} "
        f"--from-offset 0:{held_offset} --to-offset 0:{len(values)}"
    ], output
    table = _table(stopped.stdout)
    assert (table["ingested"], table["dead-lettered"], table["total"]) == (5, 3, 8), output
    assert "backfill stopped by the dead-letter breaker" in stopped.stderr, output
    assert "(exit status 4)" in stopped.stderr, output
    assert "unexpected error" not in output and "backfill failed" not in output, output
    # Exactly 3 dead letters (not the held event); the good events before it ingested;
    # nothing after it was started.
    dead = _dead_letter_sources(stack)
    assert dead == [f"{stack.topic}/0/{o}" for o in range(5, held_offset)]
    assert count(db, "ingest_failures") == 3
    assert sorted(r.source_url for r in _rows(stack)) == sorted(
        u for u in corpus.good if "/pre/" in u
    )
    assert all(srv.hits.get(u.removeprefix(srv.base_url), 0) == 0 for u in corpus.missing[4:])

    # The printed command with the breaker off: every remaining event a row or a letter.
    args = resume[0].removeprefix("resume with: fileserver backfill ").split()
    finished = _run_process(
        stack, *args, "--progress", "log", env={"FILESERVER_DLQ_MAX_CONSECUTIVE": "0"}
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr  # dead letters
    table = _table(finished.stdout)
    assert (table["ingested"], table["dead-lettered"], table["total"]) == (5, 5, 10)
    assert "resume with" not in finished.stdout and "breaker" not in finished.stdout
    _assert_rows_and_objects_match(stack, corpus)
    dead = _dead_letter_sources(stack)
    assert sorted(dead) == sorted(f"{stack.topic}/0/{o}" for o in range(5, 13))
    assert count(db, "ingest_failures") == 8


def test_payload_reasons_never_stop_a_backfill(
    kafka_stack: StackConfig, sample_server: SampleServer
) -> None:
    """105 invalid events in a row (more than FILESERVER_DLQ_MAX_CONSECUTIVE=100), then
    good ones: all dead-lettered, the run goes on to the end (exit status 1, as for any
    dead letter)."""
    stack, srv = kafka_stack, sample_server
    db = stack.database_url
    corpus = Corpus()
    invalid = [
        json.dumps({"msg_type": 1, "ptt_msg": {"uid": str(i), "file_path": ""}}).encode()
        for i in range(105)
    ]
    values = invalid + _values(srv, corpus, "ok", good=3, missing=0, bad=0, skip=0)
    asyncio.run(
        _publish_at(
            stack.kafka_bootstrap, stack.topic, values, int(time.time() * 1000), None, partitions=1
        )
    )
    summary = _run(
        stack,
        "--concurrency",
        "4",
        env={"FILESERVER_DLQ_MAX_CONSECUTIVE": "100", "FILESERVER_DLQ_BREAKER_COOLDOWN_S": "3600"},
    )
    assert summary.breaker is None and not summary.interrupted, summary.render()
    assert _counts(summary) == {Kind.DEAD_LETTERED: 105, Kind.INGESTED: 3}, summary.render()
    assert summary.exit_code == 1 and not summary.resume
    reasons = query(db, "SELECT reason, count(*) FROM ingest_failures GROUP BY reason")
    assert [tuple(r) for r in reasons] == [("invalid_event", 105)]
    assert len(set(_dead_letter_sources(stack))) == 105
    _assert_rows_and_objects_match(stack, corpus)


def _json_run(
    stack: StackConfig, *argv: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``fileserver backfill ARGV --json``: the process and its summary; stdout must be
    that one JSON object and nothing else (json.loads refuses anything after it)."""
    done = _run_process(stack, *argv, "--progress", "log", "--json", env=env)
    try:
        return done, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(
            f"stdout is not one JSON object:\n{done.stdout}\n{done.stderr}"
        ) from None


def test_json_summaries_of_a_dry_run_a_breaker_stop_and_its_resume(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    """--json on real servers: one object on stdout (the text on stderr) with the counts of
    what happened, for exit status 0 (dry run), 4 (the breaker, with the held event and the
    resume command) and 1 (dead letters; --json FILE leaves the table on stdout)."""
    stack, srv = kafka_stack, sample_server
    corpus = Corpus()
    # offsets: 0 good, 1 a msg_type 2/3, 2-3 good, 4-8 sources that answer 404, 9-10 good
    values = _values(srv, corpus, "ja", good=3, missing=0, bad=0, skip=1)
    values += _gone(srv, corpus, "jg", 5)
    values += _values(srv, corpus, "jb", good=2, missing=0, bad=0, skip=0)
    _publish_now(stack, values, corpus, partitions=1)
    held_offset = 4 + 3  # the 4th 404: the first the breaker (at 3) would hold
    assert corpus.positions[corpus.missing[3]] == (0, held_offset)
    ranges = [{"partition": 0, "start": 0, "stop": 11, "records": 11}]

    dry, doc = _json_run(stack, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "backfill of topic" in dry.stderr and "dry run (nothing written)" in dry.stderr
    assert doc["elapsed_s"] >= 0
    del doc["elapsed_s"]
    assert doc == {
        "command": "backfill",
        "mode": "dry-run",
        "topic": stack.topic,
        "ranges": ranges,
        "offsets_in_range": 11,
        "notes": [],
        "counts": {
            "new": 10,
            "already_present": 0,
            "skipped": 1,
            "would_dead_letter": 0,
            "already_failed": 0,
        },
        "total": 11,
        "dead_lettered_by_reason": {},
        "repairs": [],
        "problems": [],
        "error": None,
        "interrupted": False,
        "breaker": None,
        "held": [],
        "resume": None,
        "exit_status": 0,
        "exit_meaning": "done",
    }
    assert count(stack.database_url, "recordings") == 0

    breaker = {"FILESERVER_DLQ_MAX_CONSECUTIVE": "3", "FILESERVER_DLQ_BREAKER_COOLDOWN_S": "3600"}
    stopped, doc = _json_run(stack, "--concurrency", "1", env=breaker)
    assert stopped.returncode == 4, stopped.stderr
    assert "stopped by the dead-letter breaker" in stopped.stderr  # the table, on stderr
    command = (
        f"fileserver backfill --topic {stack.topic} "
        f"--from-offset 0:{held_offset} --to-offset 0:{len(values)}"
    )
    assert f"resume with: {command}" in stopped.stderr
    assert (doc["mode"], doc["ranges"], doc["total"]) == ("replay", ranges, 7)
    assert doc["counts"] == {
        "ingested": 3,
        "already_present": 0,
        "repaired_object": 0,
        "repaired_row": 0,
        "skipped": 1,
        "already_failed": 0,
        "dead_lettered": 3,
        "problem": 0,
        "error": 0,
    }
    assert doc["dead_lettered_by_reason"] == {"source_not_found": 3}
    assert doc["breaker"].startswith("dead-letter breaker open: 3 consecutive 'source_not_found'")
    assert doc["held"] == [
        {"topic": stack.topic, "partition": 0, "offset": held_offset, "reason": "source_not_found"}
    ]
    assert doc["resume"] == {
        "command": command,
        "ranges": [{"partition": 0, "from_offset": held_offset, "to_offset": len(values)}],
    }
    assert (doc["exit_status"], doc["exit_meaning"]) == (4, exits.meaning(4))
    assert (doc["interrupted"], doc["error"]) == (False, None)
    assert count(stack.database_url, "recordings") == 3
    assert count(stack.database_url, "ingest_failures") == 3

    # The resume command from the JSON, the breaker off, the summary to a file.
    path = tmp_path / "resume.json"
    args = doc["resume"]["command"].removeprefix("fileserver backfill ").split()
    finished = _run_process(
        stack,
        *args,
        "--progress",
        "log",
        "--json",
        str(path),
        env={"FILESERVER_DLQ_MAX_CONSECUTIVE": "0"},
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr
    table = _table(finished.stdout)  # with --json FILE the table stays on stdout
    assert (table["ingested"], table["dead-lettered"], table["total"]) == (2, 2, 4)
    assert "by reason: source_not_found 2" in finished.stdout
    doc = json.loads(path.read_text())
    assert doc["ranges"] == [{"partition": 0, "start": held_offset, "stop": 11, "records": 4}]
    assert (doc["counts"]["ingested"], doc["counts"]["dead_lettered"], doc["total"]) == (2, 2, 4)
    assert doc["dead_lettered_by_reason"] == {"source_not_found": 2}
    assert (doc["breaker"], doc["held"], doc["resume"]) == (None, [], None)
    assert (doc["exit_status"], doc["exit_meaning"]) == (1, exits.meaning(1))
    _assert_rows_and_objects_match(stack, corpus)
    assert count(stack.database_url, "ingest_failures") == 5
