"""`fileserver redrive` on real servers: dead letters that now succeed become rows, the
others stay dead letters with their new reason; --dry-run writes nothing."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from fileserver.redrive import run_redrive
from fileserver.repository import FailureFilter
from tests.helpers import count, query, stop_process, tail, wait_until


def test_redrive_recovers_what_now_succeeds(
    kafka_stack: StackConfig,
    sample_server: SampleServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, srv = kafka_stack, sample_server
    for name, value in stack.env().items():  # boto3 reads its credentials from the environment
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    srv.files["/html.mp3"] = b"<html>oops</html>" * 30
    records = [
        talk_event(srv.url("/later/a.mp3"), uid="1"),  # 404 now, appears later
        talk_event(srv.url("/later/b.mp3"), uid="2"),  # 404 now, appears later
        talk_event(srv.url("/gone/c.mp3"), uid="3"),  # 404 for good
        talk_event(srv.url("/html.mp3"), uid="4"),  # invalid_audio, then fixed to 404
        b"not json",  # malformed for good
    ]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))
    log = tmp_path / "worker.log"
    worker = start_worker(stack, log_path=log)
    try:
        wait_until(
            lambda: count(stack.database_url, "ingest_failures") == 5,
            timeout=90,
            what=f"5 dead letters\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert count(stack.database_url, "recordings") == 0

    srv.files["/later/a.mp3"] = make_mp3(1.0, freq_hz=300)
    srv.files["/later/b.mp3"] = make_mp3(1.0, freq_hz=500)
    del srv.files["/html.mp3"]
    hits_before = dict(srv.hits)

    env = dict(os.environ, **stack.env())
    dry = subprocess.run(
        [sys.executable, "-m", "fileserver", "redrive", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "5 dead letters selected" in dry.stdout
    assert (
        dry.stdout.count("would re-ingest") == 4
        and "would fail again: malformed_json" in dry.stdout
    )
    assert srv.hits == hits_before, "a dry run downloads nothing"
    assert count(stack.database_url, "ingest_failures") == 5
    assert count(stack.database_url, "recordings") == 0

    settings = stack.settings(FILESERVER_SOURCE_RETRY_S="1")
    out = io.StringIO()
    only_404 = FailureFilter(reasons=("source_not_found",))
    code = asyncio.run(run_redrive(settings, only_404, dry_run=False, concurrency=4, out=out))
    assert code == 1, out.getvalue()  # c.mp3 is still missing
    assert "recovered: 2" in out.getvalue()
    rows = query(
        stack.database_url, "SELECT source_url, kafka_offset FROM recordings ORDER BY kafka_offset"
    )
    assert [(r.source_url, r.kafka_offset) for r in rows] == [
        (srv.url("/later/a.mp3"), 0),
        (srv.url("/later/b.mp3"), 1),
    ]
    left = query(
        stack.database_url, "SELECT kafka_offset, reason FROM ingest_failures ORDER BY kafka_offset"
    )
    assert [(f.kafka_offset, f.reason) for f in left] == [
        (2, "source_not_found"),
        (3, "invalid_audio"),
        (4, "malformed_json"),
    ]

    # Everything else: the fixed html source is now a 404, so its reason changes.
    out = io.StringIO()
    code = asyncio.run(
        run_redrive(settings, FailureFilter(), dry_run=False, concurrency=4, out=out)
    )
    assert code == 1
    left = query(
        stack.database_url, "SELECT kafka_offset, reason FROM ingest_failures ORDER BY kafka_offset"
    )
    assert [(f.kafka_offset, f.reason) for f in left] == [
        (2, "source_not_found"),
        (3, "source_not_found"),
        (4, "malformed_json"),
    ]
    # Idempotent: a second full redrive changes nothing and adds no row.
    asyncio.run(
        run_redrive(settings, FailureFilter(), dry_run=False, concurrency=4, out=io.StringIO())
    )
    assert count(stack.database_url, "recordings") == 2
    assert count(stack.database_url, "ingest_failures") == 3
