"""``fileserver reconcile`` against real SeaweedFS and Postgres with planted inconsistencies.

Recordings are ingested through the real pipeline, then damaged: objects deleted,
overwritten with other bytes (another size, or the same size), sources removed or
changed, stray objects added. Reconcile must report exactly those, change nothing
unless asked, repair what the sources still serve, quarantine the strays, and leave
only the unrepairable ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pytest

from fileserver import exits
from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig
from fileserver.errors import ConfigError
from fileserver.pipeline import Outcome
from fileserver.reconcile import Kind, Progress, Repair, Report, reconcile
from fileserver.record import SourceRecord
from fileserver.runtime import open_runtime
from tests.helpers import count, query, run_cli


def _objects(stack: StackConfig) -> dict[str, bytes]:
    s3 = stack.s3_client()
    out: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = s3.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read()
    return out


@pytest.fixture(autouse=True)
def _s3_credentials(kafka_stack: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs read S3 credentials from boto3's chain, like the worker."""
    for name, value in kafka_stack.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def _cli(stack: StackConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli({**os.environ, **stack.env()}, "reconcile", *args, timeout=300)


async def test_reconcile_reports_repairs_and_quarantines(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack, sample_server
    names = ["ok1", "ok2", "deleted", "source_gone", "resized", "flipped", "source_changed"]
    files = {name: make_mp3(1.0 + 0.25 * i, freq_hz=250 + 30 * i) for i, name in enumerate(names)}
    for i, name in enumerate(names):
        srv.files[f"/rc/room_1_user_{i}_{1569569600 + i}.mp3"] = files[name]
    url = {
        name: srv.url(f"/rc/room_1_user_{i}_{1569569600 + i}.mp3") for i, name in enumerate(names)
    }

    async with open_runtime(stack.settings()) as runtime:
        for i, name in enumerate(names):
            event = talk_event(url[name], uid=str(20 + i), grp_id="3", timestamp=1569569600 + i)
            record = SourceRecord(stack.topic, 0, i, json.dumps(event).encode())
            result = await runtime.ingestor.ingest(record)
            assert result.outcome is Outcome.INGESTED
    rows = {
        r.source_url: r
        for r in query(stack.database_url, "SELECT id, source_url, s3_key, md5 FROM recordings")
    }
    key = {name: rows[url[name]].s3_key for name in names}
    row_id = {name: rows[url[name]].id for name in names}

    # Plant the inconsistencies.
    s3 = stack.s3_client()
    b = stack.bucket
    for name in ("deleted", "source_gone", "source_changed"):
        s3.delete_object(Bucket=b, Key=key[name])
    del srv.files[f"/rc/room_1_user_{names.index('source_gone')}_1569569603.mp3"]
    srv.files[f"/rc/room_1_user_{names.index('source_changed')}_1569569606.mp3"] = make_mp3(0.5)
    s3.put_object(Bucket=b, Key=key["resized"], Body=files["resized"][:-100])
    flipped = bytearray(files["flipped"])
    flipped[len(flipped) // 2] ^= 0xFF
    s3.put_object(Bucket=b, Key=key["flipped"], Body=bytes(flipped))
    stray = {
        "3/20/2019/09/27/1569560000-" + "0" * 32 + ".mp3": make_mp3(0.5, freq_hz=999),
        "zz-not-a-recording.bin": b"stray bytes",
    }
    for k, data in stray.items():
        s3.put_object(Bucket=b, Key=k, Body=data)
    s3.put_object(Bucket=b, Key="quarantine/earlier.mp3", Body=b"quarantined before")
    before = _objects(stack)

    # 1. Read-only, default minimum age: the fresh strays are not judged yet.
    report = await reconcile(stack.settings())
    assert report.counts() == {
        "missing_object": 3,
        "size_mismatch": 1,
        "md5_mismatch": 1,
        "orphan_object": 0,
    }
    assert (report.rows, report.consistent) == (7, 2)
    assert (report.recent_objects_skipped, report.quarantined_objects) == (2, 1)
    assert _objects(stack) == before and count(stack.database_url, "recordings") == 7
    # The same in batches of two (listing pages and row statements): the merge is too.
    small = await reconcile(stack.settings(), batch=2)
    assert small.counts() == report.counts()
    assert [(i.kind, i.key) for i in small.issues] == [(i.kind, i.key) for i in report.issues]
    assert (small.rows, small.objects, small.consistent) == (
        report.rows,
        report.objects,
        report.consistent,
    )

    # 2. Read-only through the command, strays judged: the report, the JSON, exit 1.
    out = tmp_path / "report.json"
    done = _cli(stack, "--min-age", "0", "--json", str(out))
    assert done.returncode == 1, done.stderr
    print("\n--- fileserver reconcile --min-age 0 --json report.json\n" + done.stdout)
    assert "missing_object" in done.stdout and "nothing was changed" in done.stdout
    doc = json.loads(out.read_text())
    assert (doc["command"], doc["exit_status"], doc["exit_meaning"]) == (
        "reconcile",
        1,
        exits.meaning(1),
    )
    assert doc["mode"] == "read-only" and doc["unresolved"] == 7
    assert doc["counts"] == {
        "missing_object": 3,
        "size_mismatch": 1,
        "md5_mismatch": 1,
        "orphan_object": 2,
    }
    by_key = {i["key"]: i for i in doc["issues"]}
    assert {i["key"] for i in doc["issues"]} == {key[n] for n in names[2:]} | set(stray)
    assert by_key[key["resized"]]["kind"] == Kind.SIZE_MISMATCH
    assert by_key[key["resized"]]["actual_size"] == len(files["resized"]) - 100
    assert by_key[key["flipped"]]["kind"] == Kind.MD5_MISMATCH
    assert by_key[key["flipped"]]["actual_md5"] == hashlib.md5(bytes(flipped)).hexdigest()
    assert by_key[key["deleted"]]["row_id"] == row_id["deleted"]
    assert by_key[key["deleted"]]["source_url"] == url["deleted"]
    assert all(i["repair"] is None for i in doc["issues"])
    assert _objects(stack) == before

    # 3. Repair through the command.
    done = _cli(stack, "--repair", "--min-age", "0", "--json")  # stdout: one object
    assert done.returncode == 1, done.stderr
    print("--- fileserver reconcile --repair --min-age 0\n" + done.stderr)
    repaired = {i["key"]: i for i in json.loads(done.stdout)["issues"]}
    for name in ("deleted", "resized", "flipped"):
        assert repaired[key[name]]["repair"] == Repair.REPAIRED, repaired[key[name]]
    assert repaired[key["source_gone"]]["repair"] == Repair.UNREPAIRABLE
    assert "source_not_found" in repaired[key["source_gone"]]["repair_detail"]
    assert repaired[key["source_changed"]]["repair"] == Repair.UNREPAIRABLE
    assert "other bytes" in repaired[key["source_changed"]]["repair_detail"]
    for k in stray:
        assert repaired[k]["repair"] == Repair.QUARANTINED

    after = _objects(stack)
    for name in ("ok1", "ok2", "deleted", "resized", "flipped"):
        assert after[key[name]] == files[name], name
        head = s3.head_object(Bucket=b, Key=key[name])
        assert head["Metadata"]["md5"] == hashlib.md5(files[name]).hexdigest()
    for name in ("source_gone", "source_changed"):
        assert key[name] not in after
    for k, data in stray.items():
        assert k not in after and after["quarantine/" + k] == data
    assert after["quarantine/earlier.mp3"] == b"quarantined before"

    # 4. What is left: only the two rows whose source cannot give their bytes back.
    report = await reconcile(stack.settings(), min_age_s=0)
    assert report.counts() == {
        "missing_object": 2,
        "size_mismatch": 0,
        "md5_mismatch": 0,
        "orphan_object": 0,
    }
    assert {i.key for i in report.issues} == {key["source_gone"], key["source_changed"]}
    assert (report.consistent, report.quarantined_objects, report.exit_code) == (5, 3, 1)


async def test_reconcile_of_an_empty_bucket_and_table_agrees(kafka_stack: StackConfig) -> None:
    report = await reconcile(kafka_stack.settings(), repair=True, min_age_s=0)
    assert (report.rows, report.objects, report.issues, report.exit_code) == (0, 0, [], 0)
    assert "the bucket and the table agree" in Report(bucket="b", repair=False).render()


async def test_reconcile_runs_the_workers_preflight_checks(
    kafka_stack: StackConfig, postgres_server_url: str
) -> None:
    """The worker's checks and words (fileserver.preflight): exit status 2, the setting
    to fix named."""
    from fileserver.devstack.servers import create_database

    settings = kafka_stack.settings()
    empty = create_database(postgres_server_url, f"t_{uuid.uuid4().hex[:12]}")
    with pytest.raises(ConfigError, match=r"no fileserver tables: run `fileserver migrate`"):
        await reconcile(replace(settings, database_url=empty))
    with pytest.raises(ConfigError, match=r"cannot use bucket FILESERVER_S3_BUCKET=nowhere"):
        await reconcile(replace(settings, s3_bucket="nowhere"))
    done = _cli(kafka_stack, "--min-age", "0")
    assert done.returncode == 0, done.stderr
    env_bucket = {"FILESERVER_S3_BUCKET": "nowhere"}
    done = run_cli({**os.environ, **kafka_stack.env(), **env_bucket}, "reconcile", timeout=300)
    assert done.returncode == 2 and "FILESERVER_S3_BUCKET=nowhere" in done.stderr, done.stderr


def test_the_reconcile_module_owns_its_parser() -> None:
    from fileserver import reconcile as module
    from fileserver.cli import build_parser

    args = build_parser().parse_args(["reconcile"])
    assert args.func is module.run_command
    assert (args.repair, args.json, args.min_age, args.quarantine_prefix, args.no_progress) == (
        False,
        None,
        3600.0,
        "quarantine/",
        False,
    )
    args = build_parser().parse_args(
        ["reconcile", "--repair", "--json", "-", "--min-age", "0", "--quarantine-prefix", "q/"]
    )
    assert (args.repair, args.json, args.min_age, args.quarantine_prefix) == (True, "-", 0.0, "q/")


def test_progress_line_only_on_a_terminal() -> None:
    class Tty(StringIO):
        def isatty(self) -> bool:
            return True

    report = Report(bucket="b", repair=False, rows=1200, objects=1199)
    tty, pipe = Tty(), StringIO()
    Progress(tty).update(report, force=True)
    Progress(pipe).update(report, force=True)
    assert tty.getvalue() == "\rreconcile: 1,200 rows, 1,199 objects, 0 issues"
    assert pipe.getvalue() == ""
