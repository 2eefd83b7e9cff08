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
from fileserver.metrics import Metrics, get_metrics
from fileserver.pipeline import Outcome, Result
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, Repository
from fileserver.retry import RetryPolicy

log = logging.getLogger("fileserver.events")


class Health:
    """Whether shared dependencies are answering; the worker pauses intake while degraded."""

    def __init__(self) -> None:
        self._ok = asyncio.Event()
        self._ok.set()
        self.reason: str | None = None
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def ok(self) -> bool:
        return self._ok.is_set()

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(ok)`` whenever the state flips."""
        self._listeners.append(listener)

    def degraded(self, reason: str) -> None:
        self.reason = reason
        if self._ok.is_set():
            log.warning("pausing intake: %s", reason)
            self._ok.clear()
            self._notify(False)

    def recovered(self) -> None:
        if not self._ok.is_set():
            log.warning("resuming intake (was: %s)", self.reason)
            self.reason = None
            self._ok.set()
            self._notify(True)

    def _notify(self, ok: bool) -> None:
        for listener in self._listeners:
            try:
                listener(ok)
            except Exception:  # a listener must not break the pipeline
                log.exception("health listener failed")

    async def wait_ok(self) -> None:
        await self._ok.wait()


class DeadLetterLimit:
    """A circuit breaker on dead letters, in the spirit of Arroyo's ``DlqLimit``.

    When ``max_consecutive`` events in a row fail permanently for the same reason
    with no success in between, the cause is probably systemic (a bad producer
    deploy, a gateway serving HTML error pages) and dead-lettering the rest of the
    topic would only move the damage. The breaker then *opens*: further events that
    fail for that reason are held (not dead-lettered, not committed) and retried
    every ``cooldown_s``; the first success closes it. ``max_consecutive=0`` disables it.
    """

    def __init__(self, max_consecutive: int = 100, cooldown_s: float = 60.0) -> None:
        self.max_consecutive = max_consecutive
        self.cooldown_s = cooldown_s
        self._reason: str | None = None
        self._count = 0

    @property
    def open(self) -> bool:
        return 0 < self.max_consecutive <= self._count

    def success(self) -> None:
        if self.open:
            log.warning("dead-letter breaker closed: an event succeeded")
        self._reason, self._count = None, 0

    def allow(self, reason: str) -> bool:
        """Count a permanent failure; ``False`` when it must be held instead of dead-lettered."""
        if self.max_consecutive <= 0:
            return True
        if reason != self._reason:
            if self.open:
                return False  # open for another reason: hold everything until a success
            self._reason, self._count = reason, 0
        if self._count >= self.max_consecutive:
            return False
        self._count += 1
        return True

    def describe(self) -> str:
        return (
            f"dead-letter breaker open: {self._count} consecutive '{self._reason}' failures "
            f"(FILESERVER_DLQ_MAX_CONSECUTIVE={self.max_consecutive}); holding events and "
            f"retrying every {self.cooldown_s:g}s"
        )


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
        breaker: DeadLetterLimit | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self._ingest = ingest
        self._repo = repo
        self._dead_letters = dead_letters
        self._source_retry_s = source_retry_s
        self._retry = retry or RetryPolicy()
        self.health = health or Health()
        self.breaker = breaker or DeadLetterLimit(max_consecutive=0)
        self._sleep = sleep
        self.metrics = metrics or get_metrics()

    async def process(self, record: SourceRecord) -> Result:
        """Ingest or dead-letter ``record``; returns only once the outcome is durable."""
        started = time.monotonic()
        while True:
            outcome = await self.attempt(record)
            if isinstance(outcome, Result):
                if outcome.outcome is not Outcome.SKIPPED:
                    self.breaker.success()
                _log_result(outcome, time.monotonic() - started, self.metrics)
                return outcome
            if self.breaker.allow(outcome.reason.value):
                return await self.dead_letter(
                    record, outcome.reason, outcome.detail, started=started
                )
            await self._hold(record, outcome)

    async def attempt(self, record: SourceRecord) -> Result | PermanentError:
        """Ingest ``record`` with the retry policy; the result, or why it can never succeed.

        Retryable source errors are retried for ``source_retry_s`` and then reported as
        ``source_unavailable``; dependency outages and bugs are retried without limit.
        """
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._ingest(record)
            except PermanentError as exc:
                return exc
            except SourceUnavailable as exc:
                if time.monotonic() - started >= self._source_retry_s:
                    return PermanentError(
                        Reason.SOURCE_UNAVAILABLE,
                        f"gave up after {attempt} attempts in FILESERVER_SOURCE_RETRY_S="
                        f"{self._source_retry_s:g}s; last error: {exc.detail}",
                    )
                await self._backoff(record, attempt, exc)
            except DependencyUnavailable as exc:
                self.health.degraded(str(exc))
                await self._backoff(record, attempt, exc)
            except Exception as exc:  # a bug: never drop the event, never crash the agent
                log.exception(
                    "unexpected error on %s (attempt %d), will retry", record.source, attempt
                )
                self.health.degraded(f"unexpected {type(exc).__name__}: {exc}")
                self.metrics.retried("unexpected")
                await self._sleep(self._retry.delay(attempt))
            else:
                self.health.recovered()
                return result

    async def _hold(self, record: SourceRecord, exc: PermanentError) -> None:
        """The breaker is open: keep the event (uncommitted) and try it again later."""
        self.health.degraded(self.breaker.describe())
        log.error("holding %s (%s): %s", record.source, exc.reason.value, self.breaker.describe())
        await self._sleep(self.breaker.cooldown_s)

    async def _backoff(self, record: SourceRecord, attempt: int, exc: RetryableError) -> None:
        delay = self._retry.delay(attempt, exc.retry_after)
        log.info("retrying %s in %.2fs (attempt %d): %s", record.source, delay, attempt, exc)
        self.metrics.retried(exc.dependency if isinstance(exc, DependencyUnavailable) else "source")
        await self._sleep(delay)

    async def dead_letter(
        self, record: SourceRecord, reason: Reason, detail: str, *, started: float | None = None
    ) -> Result:
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
        _log_result(result, None if started is None else time.monotonic() - started, self.metrics)
        return result


def _log_result(result: Result, elapsed_s: float | None, metrics: Metrics) -> None:
    """Count the outcome and write its one structured log line (fields for JSON logs)."""
    metrics.outcome(result, elapsed_s)
    record = result.record
    event = result.event or _talk_event(record)
    fields: dict[str, object] = {
        "outcome": result.outcome.value,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "elapsed_ms": None if elapsed_s is None else round(elapsed_s * 1000),
    }
    if event is not None:
        fields.update(uid=event.uid, grp_id=event.grp_id, source_url=event.file_path)
    took = "" if elapsed_s is None else f" in {elapsed_s:.3f}s"
    if result.outcome is Outcome.DEAD_LETTERED:
        fields.update(reason=result.reason, detail=result.detail)
        log.warning(
            "dead_lettered %s uid=%s grp_id=%s reason=%s detail=%s%s",
            record.source,
            fields.get("uid"),
            fields.get("grp_id"),
            result.reason,
            result.detail,
            took,
            extra={"fields": fields},
        )
    elif result.outcome is Outcome.SKIPPED:
        fields.update(msg_type=result.skipped_type)
        log.debug(
            "skipped %s msg_type=%s%s",
            record.source,
            result.skipped_type,
            took,
            extra={"fields": fields},
        )
    else:
        duration_ms = result.audio.duration_ms if result.audio else None
        fields.update(md5=result.md5, duration_ms=duration_ms, s3_key=result.s3_key)
        log.info(
            "%s %s uid=%s grp_id=%s md5=%s duration_ms=%s key=%s%s",
            result.outcome.value,
            record.source,
            fields.get("uid"),
            fields.get("grp_id"),
            result.md5,
            duration_ms,
            result.s3_key,
            took,
            extra={"fields": fields},
        )


def _talk_event(record: SourceRecord) -> TalkEvent | None:
    try:
        parsed = parse_event(record.value)
    except PermanentError:
        return None
    return parsed if isinstance(parsed, TalkEvent) else None
