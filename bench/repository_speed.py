"""Micro-benchmark of the repository's batched insert and look-up
(``python -m bench.repository_speed``).

Starts a throw-away Postgres (:func:`fileserver.devstack.servers.start_postgres`), runs
the Alembic migrations, then for each variant inserts ``--rows`` recordings through
:meth:`Repository.insert_recording` with ``--batch`` concurrent callers (so every batch
goes through the :class:`~fileserver.repository.Coalescer`, as in the worker), then
looks up as many source URLs (half of them missing) through
:meth:`Repository.recording_md5`. Prints rows/s and this process's CPU time (user +
system, i.e. Python + psycopg; the Postgres server is another process) per row.

Variants:

* ``harness``: no database, the loop and the Coalescer alone;
* ``old``: the previous multi-VALUES ``insert().values([...])`` and expanding ``IN``,
  kept here as the baseline;
* ``executemany``: a cached ``insert()`` executed with a list of parameter dicts
  (SQLAlchemy's "insertmanyvalues"), old look-up;
* ``text-arrays``: the new statements with plain lists (psycopg's text array format);
* ``any-lookup``: the new insert, look-up by ``source_url = ANY(:urls)``;
* ``new``: the repository as it is.

Each variant runs on an emptied table after a warm-up of 10 batches; ``--repeat``
runs the list again (round 2 runs on a table emptied while the connections hold
prepared statements, as after a fresh start: see ``any-lookup``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Text, any_, bindparam, cast, select, text
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fileserver.models import Recording
from fileserver.repository import (
    _INSERT_MANY,
    _MD5_BY_URLS,
    _RECORDING_COLUMNS,
    NewRecording,
    Repository,
    _BinaryArray,
    _recording_values,
)

T0 = datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)


class OldRepository(Repository):
    """The batched statements before this change (the baseline)."""

    async def _insert_recordings(self, rows: list[NewRecording]) -> list[bool]:
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row.source_url, i)
        unique = [rows[i] for i in first.values()]
        stmt = (
            insert(Recording)
            .values([asdict(r) for r in unique])
            .on_conflict_do_nothing(index_elements=["source_url"])
            .returning(Recording.source_url)
        )
        inserted = {str(r[0]) for r in await self._execute(stmt, write=True)}
        return [first[r.source_url] == i and r.source_url in inserted for i, r in enumerate(rows)]

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        rows = await self._execute(
            select(Recording.source_url, Recording.md5).where(
                Recording.source_url.in_(list(dict.fromkeys(urls)))
            ),
            write=False,
        )
        found = {str(url): str(md5) for url, md5 in rows}
        return [found.get(url) for url in urls]


_EXECUTEMANY = (
    insert(Recording)
    .on_conflict_do_nothing(index_elements=["source_url"])
    .returning(Recording.source_url)
)


class ExecutemanyRepository(OldRepository):
    """Option (a): one cached INSERT executed with a list of parameter dicts."""

    async def _insert_recordings(self, rows: list[NewRecording]) -> list[bool]:
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row.source_url, i)
        params = [rows[i].__dict__ for i in first.values()]
        async with self._autocommit.connect() as conn:
            result = await conn.execute(_EXECUTEMANY, params)
            inserted = {str(r[0]) for r in result.all()}
        return [first[r.source_url] == i and r.source_url in inserted for i, r in enumerate(rows)]


class TextArraysRepository(Repository):
    """The new statements with plain lists: psycopg's (default) text array dumper."""

    async def _insert_recordings(self, rows: list[NewRecording]) -> list[bool]:
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row.source_url, i)
        columns = zip(*(_recording_values(rows[i]) for i in first.values()), strict=True)
        params = {n: list(c) for n, c in zip(_RECORDING_COLUMNS, columns, strict=True)}
        inserted = {str(r[0]) for r in await self._execute(_INSERT_MANY, write=True, params=params)}
        return [first[r.source_url] == i and r.source_url in inserted for i, r in enumerate(rows)]

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        rows = await self._execute(
            _MD5_BY_URLS, write=False, params={"urls": list(dict.fromkeys(urls))}
        )
        found = {str(url): str(md5) for url, md5 in rows}
        return [found.get(url) for url in urls]


_MD5_BY_ANY = select(Recording.source_url, Recording.md5).where(
    Recording.source_url == any_(cast(bindparam("urls"), ARRAY(Text())))
)


class AnyLookupRepository(Repository):
    """The new insert; look-up by ``source_url = ANY(:urls)`` (its generic plan on a
    table that was small when it was planned is a sequential scan: see round 2)."""

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        rows = await self._execute(
            _MD5_BY_ANY, write=False, params={"urls": _BinaryArray(dict.fromkeys(urls))}
        )
        found = {str(url): str(md5) for url, md5 in rows}
        return [found.get(url) for url in urls]


class HarnessRepository(Repository):
    """No database at all: what the benchmark loop and the Coalescer cost by themselves."""

    async def _insert_recordings(self, rows: list[NewRecording]) -> list[bool]:
        await asyncio.sleep(0)
        return [not r.source_url.endswith("!") for r in rows]

    async def _recording_md5s(self, urls: list[str]) -> list[str | None]:
        await asyncio.sleep(0)
        return [None for _ in urls]


def make_row(i: int) -> NewRecording:
    return NewRecording(
        uid=10_000_000_000 + i,
        grp_id=i % 17,
        m_type="ptt",
        source_url=f"http://127.0.0.1:8080/c/{i}/room_1_user_{i}_{1569569600 + i}.mp3",
        source_ip=None if i % 3 == 0 else "127.0.0.1",
        event_time=T0 + timedelta(seconds=i),
        md5=f"{i:032x}",
        size_bytes=9000 + i,
        duration_ms=3000,
        bitrate=24000,
        sample_rate=16000,
        channels=1,
        s3_bucket="recordings",
        s3_key=f"1/{i}/2019/09/27/{1569569600 + i}-{i:032x}.mp3",
        kafka_topic="events",
        kafka_partition=i % 4,
        kafka_offset=i,
    )


async def _measure(
    label: str, what: str, n: int, batch: int, call: Callable[[int], Any]
) -> dict[str, float]:
    """Run ``call(i)`` for ``i`` in ``range(n)``, ``batch`` at a time concurrently."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        await asyncio.gather(*(call(i) for i in range(start, min(n, start + batch))))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = {"rows_per_s": n / wall, "cpu_us_per_row": cpu / n * 1e6}
    print(
        f"{label:<12} {what:<7} {n:>7} rows  {result['rows_per_s']:>9.0f} rows/s  "
        f"{result['cpu_us_per_row']:>7.1f} µs CPU/row",
        flush=True,
    )
    return result


async def _variant(
    label: str, cls: type[Repository], engine: AsyncEngine, rows: int, batch: int
) -> dict[str, dict[str, float]]:
    repo = cls(engine, batch_rows=batch)
    real = cls is not HarnessRepository
    async with engine.connect() as conn:
        await conn.execute(text("TRUNCATE recordings"))
        await conn.commit()
    # warm-up: pool connections, compiled caches, psycopg prepared statements
    warm = [make_row(-1 - i) for i in range(batch * 10)]
    for start in range(0, len(warm), batch):
        await asyncio.gather(*(repo.insert_recording(r) for r in warm[start : start + batch]))
        await asyncio.gather(
            *(repo.recording_md5(r.source_url) for r in warm[start : start + batch])
        )
    data = [make_row(i) for i in range(rows)]

    async def ins(i: int) -> None:
        assert await repo.insert_recording(data[i]) is True

    async def again(i: int) -> None:
        assert await repo.insert_recording(data[i]) is not real

    async def look(i: int) -> None:
        # every other URL is missing
        row = data[i // 2]
        url = row.source_url if i % 2 == 0 else row.source_url + ".missing"
        md5 = await repo.recording_md5(url)
        assert md5 == (row.md5 if i % 2 == 0 and real else None)

    return {
        "insert": await _measure(label, "insert", rows, batch, ins),
        "re-ins": await _measure(label, "re-ins", rows, batch, again),
        "lookup": await _measure(label, "lookup", rows, batch, look),
    }


VARIANTS: dict[str, type[Repository]] = {
    "harness": HarnessRepository,
    "old": OldRepository,
    "executemany": ExecutemanyRepository,
    "text-arrays": TextArraysRepository,
    "any-lookup": AnyLookupRepository,
    "new": Repository,
}


async def _run(url: str, args: argparse.Namespace) -> None:
    connect_args: dict[str, Any] = {}
    if args.prepare_threshold != "default":
        connect_args["prepare_threshold"] = (
            None if args.prepare_threshold == "none" else int(args.prepare_threshold)
        )
    # as fileserver.runtime.make_engine, with the psycopg option under test
    engine = create_async_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
    )
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(args.repeat):
            for name in args.variants:
                result = await _variant(name, VARIANTS[name], engine, args.rows, args.batch)
                for what, figures in result.items():
                    runs.setdefault((name, what), []).append(figures)
    finally:
        await engine.dispose()
    print(f"\nbest of {args.repeat} (highest rows/s, lowest CPU):")
    for (name, what), all_figures in runs.items():
        rate = max(f["rows_per_s"] for f in all_figures)
        cpu = min(f["cpu_us_per_row"] for f in all_figures)
        print(f"{name:<12} {what:<7} {rate:>9.0f} rows/s  {cpu:>7.1f} µs CPU/row")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="rounds over the variants")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["harness", "old", "new"]
    )
    parser.add_argument(
        "--prepare-threshold",
        default="default",
        help="psycopg prepare_threshold: default (5), none (never), or a number",
    )
    args = parser.parse_args(argv)

    from fileserver.devstack.servers import start_postgres
    from fileserver.migrate import upgrade

    with (
        tempfile.TemporaryDirectory(prefix="repo-bench-") as tmp,
        start_postgres(Path(tmp) / "postgres") as pg,
    ):
        url = pg.create_database("bench_repository")
        upgrade(url)
        print(f"rows={args.rows} batch={args.batch} prepare_threshold={args.prepare_threshold}")
        asyncio.run(_run(url, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
