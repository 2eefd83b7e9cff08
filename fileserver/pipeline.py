"""The ingest pipeline: one talk event in, one object + one row out.

:meth:`Ingestor.ingest` is a plain async function made of named steps::

    parse -> already_done -> fetch -> verify_md5 -> probe -> check_duration
          -> analyse -> store -> record

Two steps decide something about the event without failing it for good on their own:

* ``fetch``: a 404/410 within ``FILESERVER_NOT_FOUND_GRACE_S`` of the event's own time
  is raised as ``SourceUnavailable`` (retried by the processor like a 503), after it as
  ``source_not_found`` (:meth:`Ingestor.late_file`, the one place that decides it);
* ``analyse``: the speech analysis (:mod:`fileserver.analysis`) never fails an event; a
  burst it skips or cannot decode is stored with its analysis columns ``NULL``.

It raises the fileserver error tree and decides nothing about retries or dead
letters: that is :class:`fileserver.processor.Processor`'s job. The faust agent, the
backfill command and the tests all drive this same function.

:class:`Ingestor` calls its adapters through the small Protocols below (what it uses of
them, nothing more): :class:`~fileserver.fetch.Fetcher`,
:class:`~fileserver.storage.ObjectStore` and :class:`~fileserver.repository.Repository`
satisfy them as they are, and tests pass small fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from fileserver.analysis import Analysis
from fileserver.analyzer import Analyzer
from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.events import SkippedEvent, TalkEvent, parse_event
from fileserver.layout import object_key, object_metadata
from fileserver.metrics import Metrics, get_metrics
from fileserver.probe import AudioInfo, check_duration, probe, probe_bytes
from fileserver.record import SourceRecord
from fileserver.repository import NewRecording, Prior
from fileserver.settings import Settings

log = logging.getLogger(__name__)
INLINE_PROBE_BYTES = 64 * 1024
#: The default of ``FILESERVER_NOT_FOUND_GRACE_S`` (see :meth:`Ingestor.late_file`).
NOT_FOUND_GRACE_S = 30.0
#: Within the grace window a missing file is tried again after half the event's age (at
#: least this long), and once more right at the window's end: ~12 requests in 30 s,
#: most of them in the first seconds, when a late file most likely appears.
LATE_FILE_MIN_DELAY_S = 0.5


class Outcome(StrEnum):
    """How one record ended."""

    INGESTED = "ingested"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    DEAD_LETTERED = "dead_lettered"
    #: delivered again after its dead letter was written (its offset was not committed
    #: yet): the dead letter stands, so the event still ends as exactly one row
    ALREADY_FAILED = "already_failed"


class Fetched(Protocol):
    """A downloaded recording (:class:`fileserver.fetch.Download`): valid inside its
    ``download`` block."""

    @property
    def md5(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def content(self) -> bytes | Path:
        """The bytes when in memory, else the temporary file holding them."""
        ...

    @property
    def url(self) -> str:
        """The URL it was downloaded from (for messages)."""
        ...


class Downloads(Protocol):
    """Where recordings come from (:class:`fileserver.fetch.Fetcher`)."""

    def download(self, url: str) -> AbstractAsyncContextManager[Fetched]:
        """Download ``url``; what it leaves behind is removed when the block exits."""
        ...


class Objects(Protocol):
    """Where recordings are stored (:class:`fileserver.storage.ObjectStore`)."""

    @property
    def bucket(self) -> str: ...

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        """Store ``content`` under ``key``, verified against ``md5_hex``."""
        ...


class Recordings(Protocol):
    """What is recorded about events (:class:`fileserver.repository.Repository`)."""

    async def prior_outcome(
        self, source_url: str, topic: str, partition: int, offset: int
    ) -> Prior:
        """The row from ``source_url``, and whether that position was dead-lettered."""
        ...

    async def insert_recording(self, row: NewRecording) -> bool:
        """Insert ``row``; ``False`` when a row with its ``source_url`` exists."""
        ...


@dataclass(frozen=True)
class Result:
    """The outcome of one record, with what is worth logging about it."""

    outcome: Outcome
    record: SourceRecord
    event: TalkEvent | None = None
    md5: str | None = None
    s3_key: str | None = None
    audio: AudioInfo | None = None
    analysis: Analysis | None = None
    reason: str | None = None
    detail: str | None = None
    skipped_type: int | None = None


class Ingestor:
    """Runs the pipeline steps for one record at a time (safe to call concurrently)."""

    def __init__(
        self,
        fetcher: Downloads,
        store: Objects,
        repo: Recordings,
        *,
        max_duration_s: int,
        not_found_grace_s: float = NOT_FOUND_GRACE_S,
        analyzer: Analyzer | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetcher = fetcher
        self.store = store
        self.repo = repo
        self.max_duration_s = max_duration_s
        self.not_found_grace_s = not_found_grace_s
        self.analyzer = analyzer or Analyzer()
        self.metrics = metrics or get_metrics()
        self.clock = clock

    @classmethod
    def from_settings(
        cls, fetcher: Downloads, store: Objects, repo: Recordings, settings: Settings
    ) -> Ingestor:
        """The worker's and backfill's ingestor: limits, late-file window and analysis
        from ``settings``."""
        return cls(
            fetcher,
            store,
            repo,
            max_duration_s=settings.max_duration_s,
            not_found_grace_s=settings.not_found_grace_s,
            analyzer=Analyzer.from_settings(settings),
        )

    async def ingest(self, record: SourceRecord) -> Result:
        """Ingest one record; raises ``RetryableError`` or ``PermanentError`` on failure."""
        parsed = parse_event(record.value)
        if isinstance(parsed, SkippedEvent):
            return Result(Outcome.SKIPPED, record, skipped_type=parsed.msg_type)
        event = parsed
        done = await self.already_done(record, event)
        if done is not None:
            return Result(done, record, event=event)
        metrics = self.metrics
        fetching = metrics.stopwatch()
        async with AsyncExitStack() as stack:
            try:
                download = await stack.enter_async_context(self.fetcher.download(event.file_path))
            except PermanentError as exc:
                late = self.late_file(event, exc)
                if late is None:
                    raise
                raise late from exc
            metrics.fetched(download.size, fetching.elapsed())
            self.verify_md5(event, download)
            with metrics.stage("probe"):
                audio = await self.probe(download)
            check_duration(audio, self.max_duration_s)
            analysis = await self.analyse(event, download, audio)
            with metrics.stage("upload"):
                key = await self.upload(event, download)
            metrics.uploaded(download.size)
            with metrics.stage("record"):
                inserted = await self.record(record, event, download, audio, key, analysis)
        outcome = Outcome.INGESTED if inserted else Outcome.DUPLICATE
        return Result(
            outcome,
            record,
            event=event,
            md5=download.md5,
            s3_key=key,
            audio=audio,
            analysis=analysis,
        )

    def late_file(self, event: TalkEvent, exc: PermanentError) -> SourceUnavailable | None:
        """Whether a failed download is a file not served *yet*: a 404/410 within
        ``FILESERVER_NOT_FOUND_GRACE_S`` of ``ptt_msg.timestamp`` (either side: the
        gateway's clock may be ahead of ours) becomes ``SourceUnavailable``; ``None``:
        the failure stays what it was.

        Gateways publish the event a moment before their HTTP server serves the file (it
        is still being flushed and renamed): that 404 turns into a 200 a second later.
        The processor retries ``SourceUnavailable`` like a 503; once the window has
        passed, the same 404 is ``source_not_found`` at once (a backfill or redrive of an
        old event never waits). The retry comes after half the event's age (at least
        :data:`LATE_FILE_MIN_DELAY_S`) and never after the window's end, so a file that
        never appears is dead-lettered right when the window closes. The window must
        stay under ``FILESERVER_SOURCE_RETRY_S`` (300 s), or the processor gives up
        first, as ``source_unavailable``.
        """
        grace = self.not_found_grace_s
        if exc.reason is not Reason.SOURCE_NOT_FOUND or grace <= 0:
            return None
        age = self.clock() - event.timestamp
        if abs(age) >= grace:
            return None
        delay = min(max(LATE_FILE_MIN_DELAY_S, abs(age) / 2), grace - age + 0.05)
        return SourceUnavailable(
            f"{exc.detail} {age:.1f}s after the event's time: tried again within "
            f"FILESERVER_NOT_FOUND_GRACE_S={grace:g}",
            retry_after=delay,
        )

    async def analyse(
        self, event: TalkEvent, download: Fetched, audio: AudioInfo | None = None
    ) -> Analysis | None:
        """The burst's speech analysis, ``None`` when off, skipped or failed (never
        raises for the recording's sake; see :class:`~fileserver.analyzer.Analyzer`).
        ``audio``: the probe's reading, which the decoded length is checked against."""
        outcome = await self.analyzer.run(
            download.content,
            download.size,
            download.url,
            expected_ms=None if audio is None else audio.duration_ms,
        )
        self.metrics.analysed(
            outcome.result,
            cpu_s=outcome.cpu_s,
            grp_id=event.grp_id,
            empty=outcome.analysis is not None and outcome.analysis.empty,
        )
        return outcome.analysis

    async def already_done(self, record: SourceRecord, event: TalkEvent) -> Outcome | None:
        """``DUPLICATE`` when a row for this source URL exists (redeliveries skip the
        download), ``ALREADY_FAILED`` when this position was dead-lettered before (a
        redelivery must not add a second outcome; ``redrive`` re-runs it on purpose)."""
        prior = await self.repo.prior_outcome(
            event.file_path, record.topic, record.partition, record.offset
        )
        if prior.md5 is not None:
            return Outcome.DUPLICATE
        if prior.failed and not record.redrive:
            return Outcome.ALREADY_FAILED
        return None

    @staticmethod
    def verify_md5(event: TalkEvent, download: Fetched) -> None:
        """Compare with the sender's md5 when it sent a real digest (not ``"md5"``)."""
        if event.sender_md5 is not None and event.sender_md5 != download.md5:
            raise PermanentError(
                Reason.MD5_MISMATCH,
                f"sender md5 {event.sender_md5} != downloaded {download.md5}",
            )

    @staticmethod
    async def probe(download: Fetched) -> AudioInfo:
        """Read the recording as MPEG audio: inline when small (a 9 KB clip takes ~50 µs,
        less than a thread hand-off costs), off the event loop otherwise."""
        content = download.content
        if isinstance(content, bytes):
            if download.size <= INLINE_PROBE_BYTES:
                return probe_bytes(content, download.url)
            return await asyncio.to_thread(probe_bytes, content, download.url)
        return await asyncio.to_thread(probe, content)

    async def upload(self, event: TalkEvent, download: Fetched) -> str:
        """Store the file under its deterministic key (:mod:`fileserver.layout`); returns
        the key."""
        key = object_key(event, download.md5)
        metadata = object_metadata(
            uid=event.uid, grp_id=event.grp_id, md5=download.md5, timestamp=event.timestamp
        )
        await self.store.put_file(key, download.content, download.md5, metadata)
        return key

    async def record(
        self,
        record: SourceRecord,
        event: TalkEvent,
        download: Fetched,
        audio: AudioInfo,
        key: str,
        analysis: Analysis | None = None,
    ) -> bool:
        """Insert the metadata row; ``False`` if a concurrent delivery won the race."""
        a = analysis
        return await self.repo.insert_recording(
            NewRecording(
                uid=event.uid,
                grp_id=event.grp_id,
                m_type=event.m_type,
                source_url=event.file_path,
                source_ip=event.source_ip,
                event_time=event.event_time,
                md5=download.md5,
                size_bytes=download.size,
                duration_ms=audio.duration_ms,
                bitrate=audio.bitrate,
                sample_rate=audio.sample_rate,
                channels=audio.channels,
                s3_bucket=self.store.bucket,
                s3_key=key,
                kafka_topic=record.topic,
                kafka_partition=record.partition,
                kafka_offset=record.offset,
                peak_dbfs=None if a is None else a.peak_dbfs,
                rms_dbfs=None if a is None else a.rms_dbfs,
                speech_ratio=None if a is None else a.speech_ratio,
                leading_silence_ms=None if a is None else a.leading_silence_ms,
                trailing_silence_ms=None if a is None else a.trailing_silence_ms,
                clipped_ratio=None if a is None else a.clipped_ratio,
                empty=None if a is None else a.empty,
            )
        )
