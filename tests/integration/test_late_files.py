"""FILESERVER_NOT_FOUND_GRACE_S end to end: the real fetcher against a real HTTP source
(:class:`~fileserver.devstack.samples.SampleServer`) answering 404, the pipeline's
:meth:`~fileserver.pipeline.Ingestor.late_file` and the processor's retries, with real
time. Postgres and the dead-letter topic are in-memory fakes (their tests are elsewhere)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from fileserver.analyzer import Analyzer
from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.fetch import Fetcher
from fileserver.metrics import Metrics
from fileserver.pipeline import Ingestor, Outcome
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, NewRecording, Prior, Repository
from fileserver.runtime import make_http_client
from fileserver.settings import Settings
from fileserver.sources import SourcePolicy

PATH = "/room_1_user_14_late.mp3"
CLIP = make_mp3(2.0)


class Tables:
    """``recordings`` and ``ingest_failures`` in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, NewRecording] = {}
        self.failures: list[NewFailure] = []

    async def prior_outcome(self, url: str, topic: str, partition: int, offset: int) -> Prior:
        row = self.rows.get(url)
        return Prior(None if row is None else row.md5, False)

    async def insert_recording(self, row: NewRecording) -> bool:
        return self.rows.setdefault(row.source_url, row) is row

    async def has_failure(self, topic: str, partition: int, offset: int) -> bool:
        return any(f.kafka_offset == offset for f in self.failures)

    async def insert_failure(self, row: NewFailure) -> bool:
        self.failures.append(row)
        return True


class Sink:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        self.reasons.append(reason)


class Bucket:
    bucket = "recordings"

    async def put_file(self, key: str, content: Any, md5_hex: str, meta: dict[str, str]) -> None:
        pass


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(Settings(concurrency=4, read_timeout_s=2)) as client:
        yield client


def processor(
    http: httpx.AsyncClient, tmp_path: Path, tables: Tables, sink: Sink, grace_s: float
) -> Processor:
    metrics = Metrics(process=False)
    fetcher = Fetcher(
        http,
        SourcePolicy(["127.0.0.1"]),
        max_bytes=1_000_000,
        total_timeout_s=3,
        tmp_dir=str(tmp_path),
        metrics=metrics,
    )
    ingestor = Ingestor(
        fetcher,
        Bucket(),
        tables,
        max_duration_s=60,
        not_found_grace_s=grace_s,
        analyzer=Analyzer(enabled=False),
        metrics=metrics,
    )
    return Processor(
        ingestor.ingest,
        cast(Repository, tables),
        sink,
        source_retry_s=300,
        metrics=metrics,
    )


def event(server: SampleServer, timestamp: float) -> SourceRecord:
    value = talk_event(server.url(PATH), timestamp=int(timestamp))
    return SourceRecord("events", 0, 1, json.dumps(value).encode())


async def test_a_file_served_a_few_seconds_late_is_ingested(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    tables, sink = Tables(), Sink()
    with SampleServer() as server:
        loop = asyncio.get_running_loop()
        loop.call_later(3.0, server.files.__setitem__, PATH, CLIP)  # the gateway's flush
        started = time.monotonic()
        result = await processor(http, tmp_path, tables, sink, 30).process(
            event(server, time.time())
        )
        took = time.monotonic() - started
        hits = server.hits[PATH]
        url = server.url(PATH)
    assert result.outcome is Outcome.INGESTED, result
    assert url in tables.rows and sink.reasons == []
    assert 3.0 <= took < 6.0  # found at the first retry after it appeared
    assert 3 <= hits <= 8  # 404s at ~0, 0.5, 1, 1.5, 2.3 s, then the 200


async def test_a_file_never_served_is_not_found_when_the_window_closes(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    tables, sink = Tables(), Sink()
    with SampleServer() as server:
        started = time.monotonic()
        now = time.time()
        result = await processor(http, tmp_path, tables, sink, 4).process(event(server, now))
        took = time.monotonic() - started
        hits = server.hits[PATH]
    assert (result.outcome, result.reason) == (Outcome.DEAD_LETTERED, "source_not_found")
    assert sink.reasons == ["source_not_found"] and tables.rows == {}
    # the window is counted from the event's time (whole seconds): it ends 3-4 s from now
    assert 3.0 <= took < 5.5
    assert 4 <= hits <= 10
    assert "HTTP 404" in tables.failures[0].detail


async def test_an_old_event_is_not_found_at_once(http: httpx.AsyncClient, tmp_path: Path) -> None:
    tables, sink = Tables(), Sink()
    with SampleServer() as server:
        started = time.monotonic()
        old = time.time() - 31
        result = await processor(http, tmp_path, tables, sink, 30).process(event(server, old))
        took = time.monotonic() - started
        hits = server.hits[PATH]
    assert (result.outcome, result.reason) == (Outcome.DEAD_LETTERED, "source_not_found")
    assert hits == 1 and took < 1.0
