"""Retries and dead letters, in one place (the role of a dramatiq middleware).

:meth:`Processor.process` drives :meth:`Ingestor.ingest` for one record and never
raises (except on cancellation). What happens to each kind of error:

=========================  ==========================================================
``PermanentError``         dead letter (topic record + ``ingest_failures`` row), done
``SourceUnavailable``      retried with backoff for ``FILESERVER_SOURCE_RETRY_S``,
                           then dead letter ``source_unavailable``
``DependencyUnavailable``  retried with backoff for as long as it takes; the
                           :class:`Health` turns *degraded* so the worker stops taking
                           new events; never dead-lettered
any other exception        a bug: logged with its traceback and retried like a
                           dependency outage, so no event is ever dropped
=========================  ==========================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import (
    DependencyUnavailable,
    PermanentError,
    Reason,
    RetryableError,
    SourceUnavailable,
)
from fileserver.events import TalkEvent, parse_event
from fileserver.pipeline import Outcome, Result
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, Repository
from fileserver.retry import RetryPolicy

log = logging.getLogger("fileserver.events")


class Health:
    """Whether shared dependencies are answering; the worker waits while degraded."""

    def __init__(self) -> None:
        self._ok = asyncio.Event()
        self._ok.set()
        self.reason: str | None = None

    @property
    def ok(self) -> bool:
        return self._ok.is_set()

    def degraded(self, reason: str) -> None:
        if self._ok.is_set():
            log.warning("pausing intake: %s", reason)
        self.reason = reason
        self._ok.clear()

    def recovered(self) -> None:
        if not self._ok.is_set():
            log.warning("dependency back, resuming intake (was: %s)", self.reason)
        self.reason = None
        self._ok.set()

    async def wait_ok(self) -> None:
        await self._ok.wait()


def _source_url(record: SourceRecord) -> str | None:
    try:
        parsed = parse_event(record.value)
    except PermanentError:
        return None
    return parsed.file_path if isinstance(parsed, TalkEvent) else None


class Processor:
    """Applies the retry and dead-letter policy around one ingest function."""

    def __init__(
        self,
        ingest: Callable[[SourceRecord], Awaitable[Result]],
        repo: Repository,
        dead_letters: DeadLetterSink,
        *,
        source_retry_s: float,
        retry: RetryPolicy | None = None,
        health: Health | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._ingest = ingest
        self._repo = repo
        self._dead_letters = dead_letters
        self._source_retry_s = source_retry_s
        self._retry = retry or RetryPolicy()
        self.health = health or Health()
        self._sleep = sleep

    async def process(self, record: SourceRecord) -> Result:
        """Ingest or dead-letter ``record``; returns only once the outcome is durable."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._ingest(record)
            except PermanentError as exc:
                return await self.dead_letter(record, exc.reason, exc.detail)
            except SourceUnavailable as exc:
                if time.monotonic() - started >= self._source_retry_s:
                    return await self.dead_letter(
                        record,
                        Reason.SOURCE_UNAVAILABLE,
                        f"gave up after {attempt} attempts in FILESERVER_SOURCE_RETRY_S="
                        f"{self._source_retry_s:g}s; last error: {exc.detail}",
                    )
                self.health.recovered()
                await self._backoff(record, attempt, exc)
            except DependencyUnavailable as exc:
                self.health.degraded(str(exc))
                await self._backoff(record, attempt, exc)
            except Exception as exc:  # a bug: never drop the event, never crash the agent
                log.exception(
                    "unexpected error on %s (attempt %d), will retry", record.source, attempt
                )
                self.health.degraded(f"unexpected {type(exc).__name__}: {exc}")
                await self._sleep(self._retry.delay(attempt))
            else:
                self.health.recovered()
                _log_result(result)
                return result

    async def _backoff(self, record: SourceRecord, attempt: int, exc: RetryableError) -> None:
        delay = self._retry.delay(attempt, exc.retry_after)
        log.info("retrying %s in %.2fs (attempt %d): %s", record.source, delay, attempt, exc)
        await self._sleep(delay)

    async def dead_letter(self, record: SourceRecord, reason: Reason, detail: str) -> Result:
        """Publish the dead letter, then record the failure row (one row per offset).

        The record is published once per call; only a crash between the publish and
        the row can repeat it on redelivery (at-least-once on the dead-letter topic).
        """
        attempt = 0
        published = False
        while True:
            attempt += 1
            try:
                if not await self._repo.has_failure(record.topic, record.partition, record.offset):
                    if not published:
                        await self._dead_letters.publish(record, reason.value, detail)
                        published = True
                    await self._repo.insert_failure(
                        NewFailure(
                            kafka_topic=record.topic,
                            kafka_partition=record.partition,
                            kafka_offset=record.offset,
                            reason=reason.value,
                            detail=detail,
                            source_url=_source_url(record),
                            payload=record.value,
                        )
                    )
                break
            except DependencyUnavailable as exc:
                self.health.degraded(str(exc))
                await self._backoff(record, attempt, exc)
        self.health.recovered()
        result = Result(Outcome.DEAD_LETTERED, record, reason=reason.value, detail=detail)
        _log_result(result)
        return result


def _log_result(result: Result) -> None:
    record, event = result.record, result.event
    if result.outcome is Outcome.DEAD_LETTERED:
        log.warning(
            "dead_lettered %s reason=%s detail=%s", record.source, result.reason, result.detail
        )
    elif result.outcome is Outcome.SKIPPED:
        log.debug("skipped %s msg_type=%s", record.source, result.skipped_type)
    elif event is not None:
        log.info(
            "%s %s uid=%s grp_id=%s md5=%s duration_ms=%s key=%s",
            result.outcome.value,
            record.source,
            event.uid,
            event.grp_id,
            result.md5,
            result.audio.duration_ms if result.audio else None,
            result.s3_key,
        )
