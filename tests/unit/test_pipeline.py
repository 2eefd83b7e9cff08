"""``Ingestor.ingest`` end to end over small fakes of its Protocols (no network, no I/O)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from unittest.mock import patch

import pytest

from fileserver.analysis import AnalysisError
from fileserver.analyzer import Analyzer
from fileserver.devstack.samples import make_mp3
from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.metrics import Metrics
from fileserver.pipeline import Ingestor, Outcome
from fileserver.record import SourceRecord
from fileserver.repository import NewRecording, Prior

URL = "https://gw.example:9666/room_1_user_14_1569569695.mp3"
CLIP = make_mp3()
CLIP_MD5 = hashlib.md5(CLIP).hexdigest()
KEY = f"7/14/2019/09/27/1569569697-{CLIP_MD5}.mp3"


def talk(md5: str = "md5") -> bytes:
    ptt = {"uid": "14", "grp_id": "7", "timestamp": "1569569697", "file_path": URL, "md5": md5}
    return json.dumps({"msg_type": 1, "ip": "10.0.0.1", "ptt_msg": ptt}).encode()


def record(value: bytes | None = None, *, redrive: bool = False) -> SourceRecord:
    return SourceRecord("events", 2, 41, talk() if value is None else value, redrive=redrive)


@dataclass(frozen=True)
class Clip:
    md5: str
    size: int
    content: bytes | Path
    url: str


class Source:
    """Serves each URL's bytes; counts downloads."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.downloads: list[str] = []

    @asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Clip]:
        self.downloads.append(url)
        data = self.files[url]
        yield Clip(hashlib.md5(data).hexdigest(), len(data), data, url)


class Bucket:
    bucket = "recordings"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes | Path, str, dict[str, str]]] = {}

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        self.objects[key] = (content, md5_hex, metadata)


class Tables:
    """``recordings`` by source URL and the dead-lettered positions.

    ``racing``: another delivery inserts the same URL between the look-up and the insert."""

    def __init__(self, *, racing: bool = False) -> None:
        self.rows: dict[str, NewRecording] = {}
        self.failed: set[tuple[str, int, int]] = set()
        self.racing = racing
        self.lookups = 0

    async def prior_outcome(
        self, source_url: str, topic: str, partition: int, offset: int
    ) -> Prior:
        self.lookups += 1
        row = self.rows.get(source_url)
        failed = (topic, partition, offset) in self.failed
        return Prior(None if row is None else row.md5, failed)

    async def insert_recording(self, row: NewRecording) -> bool:
        if self.racing:
            return False
        if row.source_url in self.rows:
            return False
        self.rows[row.source_url] = row
        return True


@dataclass
class Rig:
    ingestor: Ingestor
    source: Source
    bucket: Bucket
    tables: Tables
    metrics: Metrics


def rig(tables: Tables | None = None, data: bytes = CLIP) -> Rig:
    source, bucket, metrics = Source({URL: data}), Bucket(), Metrics(process=False)
    tables = tables or Tables()
    ingestor = Ingestor(source, bucket, tables, max_duration_s=60, metrics=metrics)
    return Rig(ingestor, source, bucket, tables, metrics)


def stages(metrics: Metrics) -> dict[str, float]:
    return {
        stage: metrics.registry.get_sample_value(
            "fileserver_stage_duration_seconds_count", {"stage": stage}
        )
        or 0.0
        for stage in ("fetch", "probe", "upload", "record")
    }


async def test_a_good_clip_is_stored_under_its_key_and_recorded() -> None:
    r = rig()
    rec = record(talk(md5=CLIP_MD5.upper()))
    result = await r.ingestor.ingest(rec)

    assert result.outcome is Outcome.INGESTED
    assert (result.record, result.md5, result.s3_key) == (rec, CLIP_MD5, KEY)
    assert result.event is not None and result.event.uid == 14
    assert result.audio is not None and result.audio.sample_rate == 16000
    assert r.source.downloads == [URL]
    content, md5, metadata = r.bucket.objects[KEY]
    assert (content, md5) == (CLIP, CLIP_MD5)
    assert metadata == {
        "uid": "14",
        "grp-id": "7",
        "md5": CLIP_MD5,
        "event-time": "1569569697",
    }
    row = r.tables.rows[URL]
    assert (row.uid, row.grp_id, row.m_type, row.source_url, row.source_ip) == (
        14,
        7,
        "ptt",
        URL,
        "10.0.0.1",
    )
    assert row.event_time == datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)
    assert (row.md5, row.size_bytes) == (CLIP_MD5, len(CLIP))
    assert (row.duration_ms, row.bitrate, row.sample_rate, row.channels) == (
        result.audio.duration_ms,
        24000,
        16000,
        1,
    )
    assert 3000 <= row.duration_ms <= 3200
    assert (row.s3_bucket, row.s3_key) == ("recordings", KEY)
    assert (row.kafka_topic, row.kafka_partition, row.kafka_offset) == ("events", 2, 41)
    assert stages(r.metrics) == {"fetch": 1, "probe": 1, "upload": 1, "record": 1}
    assert r.metrics.registry.get_sample_value("fileserver_uploaded_bytes_total") == len(CLIP)


async def test_other_msg_types_are_skipped_without_a_lookup() -> None:
    r = rig()
    result = await r.ingestor.ingest(record(json.dumps({"msg_type": 2}).encode()))
    assert (result.outcome, result.skipped_type, result.event) == (Outcome.SKIPPED, 2, None)
    assert (r.tables.lookups, r.source.downloads, r.bucket.objects) == (0, [], {})


async def test_a_url_already_recorded_is_a_duplicate_without_a_download() -> None:
    r = rig()
    assert (await r.ingestor.ingest(record())).outcome is Outcome.INGESTED
    again = SourceRecord("events", 5, 900, talk())  # the same URL from another position
    result = await r.ingestor.ingest(again)
    assert result.outcome is Outcome.DUPLICATE and result.s3_key is None
    assert r.source.downloads == [URL] and len(r.tables.rows) == 1


async def test_a_dead_lettered_position_ends_there_unless_redriven() -> None:
    tables = Tables()
    tables.failed.add(("events", 2, 41))
    r = rig(tables)
    result = await r.ingestor.ingest(record())
    assert result.outcome is Outcome.ALREADY_FAILED
    assert (r.source.downloads, r.bucket.objects, r.tables.rows) == ([], {}, {})

    result = await r.ingestor.ingest(record(redrive=True))
    assert (result.outcome, result.s3_key) == (Outcome.INGESTED, KEY)
    assert r.source.downloads == [URL] and set(r.tables.rows) == {URL}


async def test_an_md5_mismatch_is_permanent_and_stores_nothing() -> None:
    r = rig()
    with pytest.raises(PermanentError) as caught:
        await r.ingestor.ingest(record(talk(md5="0" * 32)))
    assert caught.value.reason is Reason.MD5_MISMATCH
    assert (r.bucket.objects, r.tables.rows) == ({}, {})
    assert stages(r.metrics) == {"fetch": 1, "probe": 0, "upload": 0, "record": 0}


async def test_losing_the_insert_race_is_a_duplicate() -> None:
    r = rig(Tables(racing=True))
    result = await r.ingestor.ingest(record())
    assert (result.outcome, result.md5, result.s3_key) == (Outcome.DUPLICATE, CLIP_MD5, KEY)
    assert set(r.bucket.objects) == {KEY}  # the same deterministic key the winner wrote
    assert r.tables.rows == {}


# --- late files: FILESERVER_NOT_FOUND_GRACE_S (Ingestor.late_file) ----------------------

EVENT_TIME = 1569569697  # the timestamp talk() sends


class Missing(Source):
    """Answers every download like the fetcher does for an HTTP 404."""

    @asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Clip]:
        self.downloads.append(url)
        raise PermanentError(Reason.SOURCE_NOT_FOUND, f"HTTP 404 from {url}")
        yield  # pragma: no cover


def late_rig(age_s: float, grace_s: float = 30.0) -> Ingestor:
    return Ingestor(
        Missing({}),
        Bucket(),
        Tables(),
        max_duration_s=60,
        not_found_grace_s=grace_s,
        metrics=Metrics(process=False),
        clock=lambda: EVENT_TIME + age_s,
    )


@pytest.mark.parametrize("age_s", [0.0, 0.4, 5.0, 29.9, -3.0])
async def test_a_404_within_the_grace_window_is_retryable(age_s: float) -> None:
    with pytest.raises(SourceUnavailable) as caught:
        await late_rig(age_s).ingest(record())
    assert (
        "HTTP 404" in caught.value.detail
        and "FILESERVER_NOT_FOUND_GRACE_S=30" in caught.value.detail
    )
    assert isinstance(caught.value.__cause__, PermanentError)
    # the next try: after half the event's age (at least 0.5 s), never past the window
    delay = caught.value.retry_after
    assert delay is not None
    assert delay == pytest.approx(min(max(0.5, abs(age_s) / 2), 30.0 - age_s + 0.05))
    assert age_s + delay <= 30.0 + 0.05


async def test_the_last_retry_lands_right_after_the_window() -> None:
    with pytest.raises(SourceUnavailable) as caught:
        await late_rig(25.0).ingest(record())
    assert caught.value.retry_after == pytest.approx(5.05)


@pytest.mark.parametrize(
    ("age_s", "grace_s"), [(30.0, 30.0), (3600.0, 30.0), (-31.0, 30.0), (1.0, 0.0)]
)
async def test_a_404_outside_the_window_or_without_one_is_permanent_at_once(
    age_s: float, grace_s: float
) -> None:
    with pytest.raises(PermanentError) as caught:
        await late_rig(age_s, grace_s).ingest(record())
    assert caught.value.reason is Reason.SOURCE_NOT_FOUND


async def test_other_download_failures_are_not_given_the_window() -> None:
    class Forbidden(Source):
        @asynccontextmanager
        async def download(self, url: str) -> AsyncIterator[Clip]:
            raise PermanentError(Reason.TOO_LARGE, "Content-Length 10 GB")
            yield  # pragma: no cover

    ingestor = Ingestor(
        Forbidden({}), Bucket(), Tables(), max_duration_s=60, clock=lambda: EVENT_TIME
    )
    with pytest.raises(PermanentError) as caught:
        await ingestor.ingest(record())
    assert caught.value.reason is Reason.TOO_LARGE


# --- speech analysis in the pipeline -------------------------------------------------------


async def test_the_row_carries_the_analysis_and_empty_bursts_are_counted_by_group() -> None:
    r = rig()  # CLIP is a steady 440 Hz tone: no speech
    result = await r.ingestor.ingest(record())
    row = r.tables.rows[URL]
    assert result.analysis is not None
    assert row.empty is True and row.speech_ratio == 0.0
    assert row.peak_dbfs is not None and -13.5 < row.peak_dbfs < -11.5  # amplitude 8000
    assert row.rms_dbfs is not None and -16.5 < row.rms_dbfs < -14.5  # a sine: peak - 3 dB
    assert row.clipped_ratio == 0.0
    assert row.leading_silence_ms == row.trailing_silence_ms == result.analysis.decoded_ms
    assert (
        r.metrics.registry.get_sample_value("fileserver_empty_bursts_total", {"grp_id": "7"}) == 1
    )
    assert (
        r.metrics.registry.get_sample_value("fileserver_analyses_total", {"result": "analysed"})
        == 1
    )
    cpu = r.metrics.registry.get_sample_value("fileserver_analysis_cpu_seconds_total")
    assert cpu is not None and 0 < cpu < 1


async def test_analysis_off_or_skipped_leaves_the_columns_null() -> None:
    for analyzer, result in (
        (Analyzer(enabled=False), "disabled"),
        (Analyzer(max_bytes=len(CLIP) - 1), "skipped_size"),
    ):
        source, tables, metrics = Source({URL: CLIP}), Tables(), Metrics(process=False)
        ingestor = Ingestor(
            source, Bucket(), tables, max_duration_s=60, analyzer=analyzer, metrics=metrics
        )
        assert (await ingestor.ingest(record())).outcome is Outcome.INGESTED
        row = tables.rows[URL]
        analysed = (row.peak_dbfs, row.rms_dbfs, row.speech_ratio, row.leading_silence_ms)
        assert analysed == (None, None, None, None)
        assert (row.trailing_silence_ms, row.clipped_ratio, row.empty) == (None, None, None)
        assert (
            metrics.registry.get_sample_value("fileserver_analyses_total", {"result": result}) == 1
        )


async def test_a_burst_the_analysis_cannot_decode_is_still_ingested() -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AnalysisError("cannot decode: test")

    r = rig()
    with patch("fileserver.analyzer.analyse", fail):
        result = await r.ingestor.ingest(record())
    assert result.outcome is Outcome.INGESTED and result.analysis is None
    assert r.tables.rows[URL].empty is None
    samples = r.metrics.registry.get_sample_value
    assert samples("fileserver_analyses_total", {"result": "failed"}) == 1
