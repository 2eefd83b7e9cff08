"""The list queries of ``fileserver serve`` on a generated table of 1 M recordings: each
page is an index range scan read in the order asked for (no Sort, no Seq Scan), on
the index of its filter (migration 0003's, created here the same way should 0003 not
have landed). The plans, with their actual times, are printed (``pytest -s``) and
written to ``<basetemp>/list_plans.txt``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.dialects import postgresql

from fileserver.db.reads import Position, RecordingFilter, list_statement
from fileserver.migrate import upgrade

ROWS = 1_000_000
GROUPS = 2_000
UIDS = 50_000
START = datetime(2026, 10, 1, tzinfo=UTC)

# migration 0003's analysis column and indexes, as it defines them
SCHEMA = [
    "ALTER TABLE recordings ADD COLUMN IF NOT EXISTS empty boolean",
    "DROP INDEX IF EXISTS ix_recordings_grp_time",
    "DROP INDEX IF EXISTS ix_recordings_uid_time",
    "DROP INDEX IF EXISTS ix_recordings_time",
]
INDEXES = [
    "CREATE INDEX ix_recordings_grp_time ON recordings (grp_id, event_time DESC, id DESC)",
    "CREATE INDEX ix_recordings_uid_time ON recordings (uid, event_time DESC, id DESC)",
    "CREATE INDEX ix_recordings_time ON recordings (event_time DESC, id DESC)",
]
# 1 M bursts over 30 days (one every 2.6 s), 2000 talk groups, 50 000 radios, 1 in 7 empty
GENERATE = f"""
INSERT INTO recordings (uid, grp_id, m_type, source_url, source_ip, event_time, md5,
    size_bytes, duration_ms, bitrate, sample_rate, channels, s3_bucket, s3_key,
    kafka_topic, kafka_partition, kafka_offset, empty)
SELECT (g * 7919) % {UIDS}, (g * 104729) % {GROUPS}, 'audio/mpeg',
       'http://gw.example/' || g || '.mp3', '10.0.0.1',
       timestamptz '{START.isoformat()}' + g * interval '2.592 seconds',
       md5(g::text), 8000 + g % 50000, 1000 + g % 9000, 24000, 16000, 1,
       'ptt-recordings', ((g * 104729) % {GROUPS}) || '/' || g || '.mp3',
       'janus-events', g % 12, g, g % 7 = 0
FROM generate_series(1::bigint, {ROWS}) AS g
"""

MIDDLE = START + timedelta(days=15)
AFTER = Position(MIDDLE, 500_000)
CASES: list[tuple[str, RecordingFilter, Position | None, str]] = [
    ("talk group, first page", RecordingFilter(grp_id=77), None, "ix_recordings_grp_time"),
    ("talk group, next page", RecordingFilter(grp_id=77), AFTER, "ix_recordings_grp_time"),
    (
        "talk group, time range",
        RecordingFilter(grp_id=77, since=START + timedelta(days=3), until=MIDDLE),
        AFTER,
        "ix_recordings_grp_time",
    ),
    (
        "talk group, not empty",
        RecordingFilter(grp_id=77, empty=False),
        AFTER,
        "ix_recordings_grp_time",
    ),
    ("uid, next page", RecordingFilter(uid=4242), AFTER, "ix_recordings_uid_time"),
    ("everything, next page", RecordingFilter(), AFTER, "ix_recordings_time"),
    (
        "time range, next page",
        RecordingFilter(since=START + timedelta(days=3), until=MIDDLE),
        AFTER,
        "ix_recordings_time",
    ),
]


def _compile(stmt: Any) -> tuple[str, dict[str, Any]]:
    compiled = stmt.compile(dialect=postgresql.psycopg.dialect())
    return str(compiled), dict(compiled.params)


def test_every_list_query_is_an_index_range_scan_at_1m_rows(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    report: list[str] = []
    try:
        with engine.begin() as conn:
            for sql in SCHEMA:
                conn.exec_driver_sql(sql)
            started = time.monotonic()
            conn.execute(text(GENERATE))
            for sql in INDEXES:
                conn.exec_driver_sql(sql)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE recordings")
            rows = conn.exec_driver_sql("SELECT count(*) FROM recordings").scalar_one()
            assert rows >= 1_000_000
            report.append(
                f"recordings: {rows} rows generated, indexed and analysed in "
                f"{time.monotonic() - started:.1f} s"
            )
            for title, where, after, index in CASES:
                stmt = list_statement(where, 51, after, extra_columns=("empty",))
                sql, params = _compile(stmt)
                plan = "\n".join(
                    r[0]
                    for r in conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params
                    )
                )
                report.append(f"\n-- {title}: {where} after {after}\n{sql}\n{plan}")
                assert f"Index Scan using {index}" in plan, (title, plan)
                assert "Sort" not in plan and "Seq Scan" not in plan, (title, plan)
                assert "Bitmap" not in plan, (title, plan)
            # the row comparison is an index condition, not a filter over the group's rows
            stmt = list_statement(RecordingFilter(grp_id=77), 51, AFTER)
            sql, params = _compile(stmt)
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
            cond = next(line for line in plan.splitlines() if "Index Cond" in line)
            assert "event_time" in cond and "grp_id" in cond, plan
    finally:
        engine.dispose()
    summary = "\n".join(report)
    print(summary)
    out = Path(tmp_path_factory.getbasetemp()) / "list_plans.txt"
    out.write_text(summary + "\n")
