"""The batched repository (``FILESERVER_DB_BATCH_ROWS``) against a real Postgres:
concurrent inserts and look-ups share statements, each caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields, replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from fileserver.db.coalescer import Coalescer
from fileserver.errors import DependencyUnavailable
from fileserver.metrics import Metrics
from fileserver.migrate import upgrade
from fileserver.repository import NewRecording, Repository
from tests.helpers import count, query
from tests.integration.test_repository import _row


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


@pytest.fixture(params=[0.0, 0.005], ids=["no-linger", "linger-5ms"])
async def repo(
    database_url: str, metrics: Metrics, request: pytest.FixtureRequest
) -> AsyncIterator[Repository]:
    upgrade(database_url)
    engine = create_async_engine(database_url)
    repo = Repository(engine, batch_rows=50, batch_linger_s=request.param, metrics=metrics)
    yield repo
    await repo.close()
    await engine.dispose()


async def test_concurrent_inserts_are_batched_and_each_caller_learns_its_outcome(
    repo: Repository, database_url: str, metrics: Metrics
) -> None:
    rows = [_row(f"http://127.0.0.1/{i}.mp3", offset=i) for i in range(120)]
    assert await repo.insert_recording(rows[0])
    # 119 new rows, rows[0] again, and two callers racing with the same new row
    again = [
        *rows[1:],
        rows[0],
        _row("http://127.0.0.1/x.mp3", 500),
        _row("http://127.0.0.1/x.mp3", 501),
    ]
    inserted = await asyncio.gather(*(repo.insert_recording(r) for r in again))
    assert inserted[:119] == [True] * 119
    assert inserted[119] is False
    assert sorted(inserted[120:]) == [False, True]  # exactly one of the racing pair wins
    assert count(database_url, "recordings") == 121
    md5s = await asyncio.gather(
        *(repo.recording_md5(u) for u in ("http://127.0.0.1/5.mp3", "http://127.0.0.1/none.mp3"))
    )
    assert md5s == [rows[5].md5, None]

    def batched(statement: str, what: str) -> float | None:
        return metrics.registry.get_sample_value(
            f"fileserver_db_batch_rows_{what}", {"statement": statement}
        )

    # every call was counted in exactly one batch (fileserver_db_batch_rows)
    assert batched("insert", "sum") == 1 + len(again)
    assert batched("lookup", "sum") == 2
    assert (batched("insert", "count") or 0) < len(again)  # batches, not one per row


async def test_a_failed_batch_fails_every_caller_of_it() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0)
        if 13 in items:
            raise RuntimeError("boom")
        return [i * 2 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(run, max_items=10, max_flushes=1)
    results = await asyncio.gather(*(coalescer.call(i) for i in range(30)), return_exceptions=True)
    assert all(len(c) <= 10 for c in calls) and len(calls) < 30  # batched
    failed = [i for i, r in enumerate(results) if isinstance(r, RuntimeError)]
    batch = next(c for c in calls if 13 in c)
    assert failed == batch
    assert all(results[i] == i * 2 for i in range(30) if i not in batch)


def _odd_row(i: int, **changes: object) -> NewRecording:
    """A row with values at the edges of each column's type."""
    values: dict[str, object] = dict(
        uid=2**63 - 1 - i,
        grp_id=-(2**63) + i,
        m_type="NULL",  # the word, not a NULL
        source_ip=None,
        # not UTC, with microseconds
        event_time=datetime(
            2019, 9, 27, 9, 34, 57, 123456 + i, tzinfo=timezone(timedelta(hours=2))
        ),
        md5=f"{i:032x}",
        size_bytes=2**40 + i,
        duration_ms=2**31 - 1,
        bitrate=-(2**31),
        sample_rate=0,
        channels=2**15 - 1,
        s3_bucket="",
        s3_key=f'a "quoted", {{braced}} \\ back\tslash é ☃ {i}',
        kafka_topic=" leading and trailing ",
        kafka_partition=-1,
    )
    return replace(_row(f"http://127.0.0.1/odd/{i}.mp3", offset=2**62 + i), **(values | changes))


_COLUMNS = [f.name for f in fields(NewRecording)]


def _stored(database_url: str) -> list[NewRecording]:
    rows = query(database_url, f"SELECT {', '.join(_COLUMNS)} FROM recordings ORDER BY id")
    return [NewRecording(*row) for row in rows]


async def test_a_batch_answers_first_wins_duplicates_and_existing_rows_exactly(
    repo: Repository, database_url: str
) -> None:
    existing = _row("http://127.0.0.1/existing.mp3", offset=1)
    assert await repo.insert_recording(existing)
    a, b = _row("http://127.0.0.1/a.mp3", 10), _row("http://127.0.0.1/b.mp3", 11)
    a2, b2 = replace(a, kafka_offset=12), replace(b, kafka_offset=13)
    existing2 = replace(existing, kafka_offset=14)
    batch = [a, existing2, a2, b, existing, b2, a]
    assert await repo._insert_recordings(batch) == [True, False, False, True, False, False, False]
    # the first of each source_url is the one stored
    stored = {r.source_url: r.kafka_offset for r in _stored(database_url)}
    assert stored == {existing.source_url: 1, a.source_url: 10, b.source_url: 11}
    # the same batch again: nothing is new
    assert await repo._insert_recordings(batch) == [False] * len(batch)
    assert count(database_url, "recordings") == 3


async def test_concurrent_callers_with_duplicates_get_one_true_per_new_url(
    repo: Repository, database_url: str
) -> None:
    rows = [_row(f"http://127.0.0.1/{i % 30}.mp3", offset=i) for i in range(90)]
    assert await repo.insert_recording(rows[0])  # url 0 already exists
    inserted = await asyncio.gather(*(repo.insert_recording(r) for r in rows[1:]))
    by_url: dict[str, list[bool]] = {}
    for row, ok in zip(rows[1:], inserted, strict=True):
        by_url.setdefault(row.source_url, []).append(ok)
    assert by_url.pop(rows[0].source_url) == [False, False]
    assert all(sorted(oks) == [False, False, True] for oks in by_url.values())
    assert count(database_url, "recordings") == 30


async def test_values_round_trip_exactly(repo: Repository, database_url: str) -> None:
    # a batch whose source_ip is all None, then one mixing None and addresses
    first = [_odd_row(i) for i in range(3)]
    second = [
        _odd_row(3, source_ip="::1"),
        _odd_row(4),
        _odd_row(5, source_ip="NULL"),
        _odd_row(6, source_ip=""),
    ]
    assert await repo._insert_recordings(first) == [True] * 3
    assert await repo._insert_recordings(second) == [True] * 4
    stored = _stored(database_url)
    assert stored == first + second
    assert all(r.event_time.utcoffset() is not None for r in stored)
    assert [r.source_ip for r in stored] == [None, None, None, "::1", None, "NULL", ""]


async def test_an_overlong_value_fails_the_batch_instead_of_being_cut(
    repo: Repository, database_url: str
) -> None:
    with pytest.raises(DBAPIError, match="too long"):
        await repo._insert_recordings([_row(), replace(_row("http://h/x"), md5="0" * 33)])
    assert count(database_url, "recordings") == 0


async def test_lookups_of_many_urls_present_missing_and_repeated(repo: Repository) -> None:
    rows = [_odd_row(i) for i in range(150)]
    assert all(await asyncio.gather(*(repo.insert_recording(r) for r in rows)))
    missing = [f"{r.source_url}?missing" for r in rows[:100]] + ["", "NULL", 'x"{,}\\']
    urls = [r.source_url for r in rows] + missing + [r.source_url for r in rows[:20]]
    expected = [r.md5 for r in rows] + [None] * len(missing) + [r.md5 for r in rows[:20]]
    assert await asyncio.gather(*(repo.recording_md5(u) for u in urls)) == expected
    # one statement for all of them (more than a batch of the coalescer)
    assert await repo._recording_md5s(urls) == expected
    assert await repo._recording_md5s(["http://nowhere/"]) == [None]


async def test_unreachable_database_is_a_dependency_error_for_batches() -> None:
    from fileserver.devstack.servers import free_port

    engine = create_async_engine(
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    repo = Repository(engine, batch_rows=10)
    try:
        with pytest.raises(DependencyUnavailable, match="postgres"):
            await asyncio.gather(repo.insert_recording(_row()), repo.insert_recording(_row("y")))
        with pytest.raises(DependencyUnavailable, match="postgres"):
            await asyncio.gather(repo.recording_md5("a"), repo.recording_md5("b"))
    finally:
        await repo.close()
        await engine.dispose()


def test_lookup_plan_probes_the_index_even_when_planned_on_an_empty_table(
    database_url: str,
) -> None:
    """Once psycopg prepares the look-up, Postgres may reuse a generic plan made while
    the table was small; it must still probe the unique index, not scan the table."""
    from sqlalchemy.dialects import postgresql

    from fileserver.db.statements import MD5_BY_URLS

    version = int(query(database_url, "SHOW server_version_num")[0][0])
    assert version >= 160000, f"EXPLAIN (GENERIC_PLAN) needs Postgres 16+, the suite runs {version}"
    upgrade(database_url)
    sql = str(MD5_BY_URLS.compile(dialect=postgresql.psycopg.dialect()))
    assert "%(urls)s" in sql
    plan = "\n".join(
        str(r[0])
        for r in query(database_url, "EXPLAIN (GENERIC_PLAN) " + sql.replace("%(urls)s", "$1"))
    )
    assert "uq_recordings_source_url" in plan, plan
    assert "Seq Scan on recordings" not in plan, plan


async def test_a_batch_connection_killed_while_idle_is_replaced_without_failing(
    repo: Repository, database_url: str
) -> None:
    """The batches' kept-open connections: a backend killed while idle (restart,
    ``pg_terminate_backend``) is noticed by the next statement, which runs again on a new
    connection; no caller sees an error."""
    assert await repo.insert_recording(_row("first")) is True
    assert await repo.recording_md5(_row("first").source_url) is not None
    (before,) = await repo._execute(
        text("SELECT pg_backend_pid()"), write=False, held=repo._insert_conn
    )
    killed = query(
        database_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    assert len(killed) >= 2  # both kept connections
    assert await repo.insert_recording(_row("second")) is True
    assert await repo.recording_md5(_row("second").source_url) is not None
    (after,) = await repo._execute(
        text("SELECT pg_backend_pid()"), write=False, held=repo._insert_conn
    )
    assert after != before
    assert count(database_url, "recordings") == 2


async def test_one_bad_row_fails_alone_and_the_rest_of_its_batch_is_inserted(
    database_url: str, metrics: Metrics
) -> None:
    """A NUL character and a SMALLINT out of range (both a ``DataError`` from Postgres)
    in a batch of 52: the batch is run again row by row, the 50 good rows land, and each
    bad row's caller alone gets its own database error (not an outage)."""
    upgrade(database_url)
    engine = create_async_engine(database_url)
    repo = Repository(engine, batch_rows=100, batch_linger_s=0.05, metrics=metrics)
    rows = [_row(f"http://127.0.0.1/{i}.mp3", offset=i) for i in range(52)]
    rows[10] = replace(rows[10], s3_key="nul\x00inside")
    rows[40] = replace(rows[40], channels=2**15)  # SMALLINT
    pid = text("SELECT pg_backend_pid()")
    try:
        before = await repo._execute(pid, write=False, held=repo._insert_conn)
        results = await asyncio.gather(
            *(repo.insert_recording(r) for r in rows), return_exceptions=True
        )
        batches = metrics.registry.get_sample_value(
            "fileserver_db_batch_rows_count", {"statement": "insert"}
        )
        assert batches == 1  # one batch of all 52
        bad = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
        assert sorted(bad) == [10, 40]
        assert all(isinstance(r, DataError) for r in bad.values())  # not an outage
        assert "0x00" in str(bad[10]) and "out of range" in str(bad[40])
        assert [r for i, r in enumerate(results) if i not in bad] == [True] * 50
        assert count(database_url, "recordings") == 50
        # the kept connection is fine afterwards: still the same one
        assert await repo.insert_recording(replace(rows[10], s3_key="fixed")) is True
        assert await repo._execute(pid, write=False, held=repo._insert_conn) == before
    finally:
        await repo.close()
        await engine.dispose()


async def test_one_bad_lookup_fails_alone(repo: Repository) -> None:
    rows = [_row(f"http://127.0.0.1/{i}.mp3", offset=i) for i in range(20)]
    assert all(await asyncio.gather(*(repo.insert_recording(r) for r in rows)))
    urls = [r.source_url for r in rows] + ["http://127.0.0.1/\x00.mp3", "http://nowhere/"]
    results = await asyncio.gather(*(repo.recording_md5(u) for u in urls), return_exceptions=True)
    assert isinstance(results[20], DataError)  # not an outage
    assert results[:20] == [r.md5 for r in rows] and results[21] is None
