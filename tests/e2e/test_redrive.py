"""`fileserver redrive` on real servers: dead letters that now succeed become rows, the
others stay dead letters with their new reason; --dry-run writes nothing; --json (with
and without --dry-run) prints one JSON object on stdout with the same counts."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

import pytest

from fileserver import exits
from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from fileserver.redrive import run_redrive
from fileserver.repository import FailureFilter
from tests.helpers import count, query, run_cli, stop_process, tail, wait_until


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
    dry = run_cli(env, "redrive", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "5 dead letters selected" in dry.stdout
    assert (
        dry.stdout.count("would re-ingest") == 4
        and "would fail again: malformed_json" in dry.stdout
    )
    assert srv.hits == hits_before, "a dry run downloads nothing"
    assert count(stack.database_url, "ingest_failures") == 5
    assert count(stack.database_url, "recordings") == 0

    # --json: the same dry run as one JSON object on stdout, the text on stderr.
    dry = run_cli(env, "redrive", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)  # the whole of stdout: one object and nothing else
    assert "5 dead letters selected" in dry.stderr and "would re-ingest" in dry.stderr
    would = [(d["offset"], d["reason"], d["would"], d["would_reason"]) for d in doc["dead_letters"]]
    del doc["dead_letters"]
    assert doc == {
        "command": "redrive",
        "mode": "dry-run",
        "selected": 5,
        "selected_by_reason": {"invalid_audio": 1, "malformed_json": 1, "source_not_found": 3},
        "would": {"re_ingest": 4, "clear": 0, "fail_again": 1},
        "exit_status": 0,
        "exit_meaning": "done",
    }
    assert sorted(would) == [
        (0, "source_not_found", "re_ingest", None),
        (1, "source_not_found", "re_ingest", None),
        (2, "source_not_found", "re_ingest", None),
        (3, "invalid_audio", "re_ingest", None),
        (4, "malformed_json", "fail_again", "malformed_json"),
    ]
    assert srv.hits == hits_before and count(stack.database_url, "ingest_failures") == 5

    # The 404s, through the command with --json: two recover, c.mp3 is still missing.
    env_1s = {**env, "FILESERVER_SOURCE_RETRY_S": "1"}
    done = run_cli(env_1s, "redrive", "--reason", "source_not_found", "--json")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout) == {
        "command": "redrive",
        "mode": "redrive",
        "selected": 3,
        "selected_by_reason": {"source_not_found": 3},
        "recovered": 2,
        "recovered_by_outcome": {"ingested": 2},
        "failed_again": 1,
        "failed_again_by_reason": {"source_not_found": 1},
        "exit_status": 1,
        "exit_meaning": exits.meaning(1),
    }
    assert "recovered: 2" in done.stderr and "failed again: 1 source_not_found" in done.stderr
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
    settings = stack.settings(FILESERVER_SOURCE_RETRY_S="1")
    out = io.StringIO()
    code = asyncio.run(run_redrive(settings, FailureFilter(), concurrency=4, out=out)).exit_code
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
    asyncio.run(run_redrive(settings, FailureFilter(), concurrency=4, out=io.StringIO()))
    assert count(stack.database_url, "recordings") == 2
    assert count(stack.database_url, "ingest_failures") == 3
