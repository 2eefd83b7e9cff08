"""Migrations and the repository against a real Postgres."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from fileserver.errors import DependencyUnavailable
from fileserver.migrate import downgrade, upgrade
from fileserver.models import Base
from fileserver.repository import NewFailure, NewRecording, Repository
from tests.helpers import query


def _diff(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_models_match(database_url: str) -> None:
    upgrade(database_url)
    assert {"recordings", "ingest_failures"} <= _tables(database_url)
    assert _diff(database_url) == []
    downgrade(database_url, "base")
    assert not {"recordings", "ingest_failures"} & _tables(database_url)
    upgrade(database_url)
    assert _diff(database_url) == []


def test_alembic_cli_from_repo_root_does_the_same(database_url: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, FILESERVER_DATABASE_URL=database_url)
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=root, env=env, check=True
    )
    assert _diff(database_url) == []


def _row(url: str = "http://127.0.0.1/a.mp3", offset: int = 0) -> NewRecording:
    return NewRecording(
        uid=14,
        grp_id=1,
        m_type="ptt",
        source_url=url,
        source_ip="127.0.0.1",
        event_time=datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC),
        md5="0" * 32,
        size_bytes=10,
        duration_ms=3000,
        bitrate=24000,
        sample_rate=16000,
        channels=1,
        s3_bucket="b",
        s3_key="1/14/2019/09/27/1569569697-" + "0" * 32 + ".mp3",
        kafka_topic="t",
        kafka_partition=0,
        kafka_offset=offset,
    )


@pytest.fixture
async def repo(database_url: str) -> Any:
    upgrade(database_url)
    engine = create_async_engine(database_url)
    yield Repository(engine)
    await engine.dispose()


async def test_insert_recording_is_idempotent_on_source_url(
    repo: Repository, database_url: str
) -> None:
    await repo.check_schema()
    assert await repo.insert_recording(_row()) is True
    assert await repo.insert_recording(_row(offset=5)) is False
    rows = query(database_url, "SELECT kafka_offset, event_time FROM recordings")
    assert len(rows) == 1 and rows[0][0] == 0
    assert rows[0][1] == datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)
    assert await repo.recording_md5("http://127.0.0.1/a.mp3") == "0" * 32
    assert await repo.recording_md5("http://127.0.0.1/b.mp3") is None


async def test_failures_are_unique_per_position(repo: Repository, database_url: str) -> None:
    failure = NewFailure("t", 0, 7, "invalid_event", "uid missing", None, b"{}")
    assert not await repo.has_failure("t", 0, 7)
    assert await repo.insert_failure(failure) is True
    assert await repo.insert_failure(failure) is False
    assert await repo.has_failure("t", 0, 7)
    assert query(database_url, "SELECT reason, payload FROM ingest_failures") == [
        ("invalid_event", b"{}")
    ]


async def test_existing_source_urls_in_batches(repo: Repository) -> None:
    for i in range(3):
        await repo.insert_recording(_row(f"http://h/{i}.mp3", i))
    urls = [f"http://h/{i}.mp3" for i in range(2500)]
    assert await repo.existing_source_urls(urls) == {f"http://h/{i}.mp3" for i in range(3)}


async def test_unreachable_database_is_a_dependency_error() -> None:
    from fileserver.devstack.servers import free_port

    engine = create_async_engine(
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    with pytest.raises(DependencyUnavailable, match="postgres"):
        await Repository(engine).ping()
    await engine.dispose()


def _at(key: str, n: int, bucket: str = "b") -> NewRecording:
    return replace(_row(f"http://h/{n}.mp3", n), s3_bucket=bucket, s3_key=key, md5="AB" * 16)


# Keys whose byte order (the order S3 lists them in) differs from a linguistic
# collation's: upper case first, '.' before '0', a prefix before its extensions,
# multi-byte UTF-8 last.
KEYS = ["a/10.mp3", "é.mp3", "Z.mp3", "a/1.mp3x", "a/1.mp3", "~.mp3", "a/1.mp3", "B.mp3"]


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 1000])
async def test_recordings_by_key_in_byte_order_across_batches(
    repo: Repository, batch_rows: int
) -> None:
    for n, key in enumerate(KEYS):
        await repo.insert_recording(_at(key, n))
    await repo.insert_recording(_at("a/1.mp3", 99, bucket="other"))
    refs = [r async for r in repo.recordings_by_key("b", batch_rows=batch_rows)]
    assert [r.s3_key for r in refs] == sorted(KEYS, key=str.encode)
    assert [r.source_url for r in refs if r.s3_key == "a/1.mp3"] == [
        "http://h/4.mp3",
        "http://h/6.mp3",
    ]  # the same key twice: by id
    first = refs[0]
    assert (first.md5, first.size_bytes, first.uid, first.grp_id, first.s3_bucket) == (
        "ab" * 16,
        10,
        14,
        1,
        "b",
    )
    assert first.event_time == datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)
    assert [r async for r in repo.recordings_by_key("none", batch_rows=batch_rows)] == []
    assert await repo.count_recordings_at("b", "a/1.mp3") == 2
    assert await repo.count_recordings_at("other", "a/1.mp3") == 1
    assert await repo.count_recordings_at("b", "nope") == 0


def test_the_keyset_batch_reads_the_index_in_order(database_url: str) -> None:
    """Each batch is an index range scan in the scan's order, never a sort of the
    bucket's rows (the query's ``COLLATE "C"`` is the column's and the index's)."""
    from sqlalchemy.dialects import postgresql

    from fileserver.db.statements import recordings_by_key_statement

    upgrade(database_url)
    stmt = recordings_by_key_statement("b", 1000, ("k", 5))
    sql = str(
        stmt.compile(dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True})
    )
    assert 'COLLATE "C"' in sql
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
    finally:
        engine.dispose()
    assert "ix_recordings_bucket_key" in plan and "Sort" not in plan, plan
