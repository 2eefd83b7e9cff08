"""The database tables (SQLAlchemy 2.0 declarative). The Alembic migrations must match."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of fileserver's tables."""


class Recording(Base):
    """One ingested talk burst: its object in S3 and what we know about it."""

    __tablename__ = "recordings"
    __table_args__ = (
        UniqueConstraint("source_url", name="uq_recordings_source_url"),
        # The order ``reconcile`` reads a bucket's rows in (the order S3 lists keys, then
        # id): each batch of its keyset scan is an index range scan, not a sort of all
        # the bucket's rows (migration 0002).
        Index("ix_recordings_bucket_key", "s3_bucket", "s3_key", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    uid: Mapped[int] = mapped_column(BigInteger)
    grp_id: Mapped[int] = mapped_column(BigInteger)
    m_type: Mapped[str] = mapped_column(Text)
    source_url: Mapped[str] = mapped_column(Text)
    source_ip: Mapped[str | None] = mapped_column(Text)
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    md5: Mapped[str] = mapped_column(CHAR(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(Integer)
    bitrate: Mapped[int] = mapped_column(Integer)
    sample_rate: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(SmallInteger)
    s3_bucket: Mapped[str] = mapped_column(Text)
    # An S3 key is compared byte by byte (S3's order): collation "C" (migration 0002).
    s3_key: Mapped[str] = mapped_column(Text(collation="C"))
    kafka_topic: Mapped[str] = mapped_column(Text)
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Speech analysis (fileserver.analysis, migration 0003); all NULL when the burst was
    # not analysed (analysis off, file over FILESERVER_ANALYSIS_MAX_BYTES, undecodable,
    # or ingested before 0003).
    peak_dbfs: Mapped[float | None] = mapped_column(Double)
    rms_dbfs: Mapped[float | None] = mapped_column(Double)
    speech_ratio: Mapped[float | None] = mapped_column(Double)
    leading_silence_ms: Mapped[int | None] = mapped_column(Integer)
    trailing_silence_ms: Mapped[int | None] = mapped_column(Integer)
    clipped_ratio: Mapped[float | None] = mapped_column(Double)
    empty: Mapped[bool | None] = mapped_column(Boolean)


# Newest-first keyset pagination of the read API (``fileserver serve``): by talk group,
# by radio, and over everything, each ``ORDER BY event_time DESC, id DESC`` read straight
# from its index (migration 0003, built concurrently).
Index(
    "ix_recordings_grp_time",
    Recording.grp_id,
    Recording.event_time.desc(),
    Recording.id.desc(),
)
Index(
    "ix_recordings_uid_time",
    Recording.uid,
    Recording.event_time.desc(),
    Recording.id.desc(),
)
Index("ix_recordings_time", Recording.event_time.desc(), Recording.id.desc())


class IngestFailure(Base):
    """One dead-lettered event, keyed by where it was read."""

    __tablename__ = "ingest_failures"
    __table_args__ = (
        UniqueConstraint(
            "kafka_topic", "kafka_partition", "kafka_offset", name="uq_ingest_failures_source"
        ),
        Index("ix_ingest_failures_reason", "reason"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kafka_topic: Mapped[str] = mapped_column(Text)
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
    source_url: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
