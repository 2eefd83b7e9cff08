"""The rows fileserver reads and writes (plain values; no SQLAlchemy)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class NewRecording:
    """A row to insert into ``recordings``."""

    uid: int
    grp_id: int
    m_type: str
    source_url: str
    source_ip: str | None
    event_time: datetime
    md5: str
    size_bytes: int
    duration_ms: int
    bitrate: int
    sample_rate: int
    channels: int
    s3_bucket: str
    s3_key: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    # speech analysis (:class:`fileserver.analysis.Analysis`); ``None``: not analysed
    peak_dbfs: float | None = None
    rms_dbfs: float | None = None
    speech_ratio: float | None = None
    leading_silence_ms: int | None = None
    trailing_silence_ms: int | None = None
    clipped_ratio: float | None = None
    empty: bool | None = None


@dataclass(frozen=True)
class NewFailure:
    """A row to insert into ``ingest_failures``."""

    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    reason: str
    detail: str
    source_url: str | None
    payload: bytes | None


@dataclass(frozen=True)
class FailureRow(NewFailure):
    """A row of ``ingest_failures``."""

    id: int
    failed_at: datetime


@dataclass(frozen=True)
class FailureFilter:
    """Which dead letters to select (every field optional)."""

    reasons: tuple[str, ...] = ()
    topic: str | None = None
    partitions: tuple[int, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None


@dataclass(frozen=True)
class StoredRow:
    """What ``backfill --verify`` compares: a recording row's content and object."""

    md5: str
    size_bytes: int
    s3_bucket: str
    s3_key: str


@dataclass(frozen=True)
class RecordingRef:
    """What a ``recordings`` row says about its object: where it is, what it holds and
    what it was stored with (``reconcile``; ``md5`` in lower case)."""

    id: int
    source_url: str
    md5: str
    size_bytes: int
    uid: int
    grp_id: int
    event_time: datetime
    s3_bucket: str
    s3_key: str


@dataclass(frozen=True)
class Prior:
    """What the tables already hold for one event: the md5 of the recording from its
    source URL, and whether its Kafka position already has a failure row."""

    md5: str | None
    failed: bool


#: (source_url, topic, partition, offset)
PriorKey = tuple[str, str, int, int]
