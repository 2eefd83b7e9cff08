"""Retries and dead letters, in one place (the role of a dramatiq middleware).

:meth:`Processor.process` drives :meth:`Ingestor.ingest` for one record and never
raises (except on cancellation, and :class:`BreakerOpen` when asked not to hold).
What happens to each kind of error:

=========================  ==========================================================
``PermanentError``         dead letter (topic record + ``ingest_failures`` row), done
``SourceUnavailable``      retried with backoff for ``FILESERVER_SOURCE_RETRY_S``,
                           then dead letter ``source_unavailable``
``DependencyUnavailable``  retried with backoff for as long as it takes
                           (:class:`~fileserver.retry.DependencyRetry`, the one loop
                           that does); the :class:`Health` turns *degraded* so the
                           worker stops taking new events; never dead-lettered
any other exception        a bug: logged with its traceback, retried
                           ``FILESERVER_INTERNAL_ERROR_ATTEMPTS`` times in all, then
                           dead letter ``internal_error`` with a traceback summary (the
                           bytes are kept: ``fileserver redrive`` re-runs it after a fix)
=========================  ==========================================================

The dead-letter breaker (:class:`DeadLetterLimit`) counts only reasons a retry can fix
(the source's and the content's side); reasons decided by the record's bytes
(:data:`~fileserver.errors.PAYLOAD_REASONS`) are dead-lettered at once, always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from fileserver.deadletter import DeadLetterSink
from fileserver.errors import (
    PAYLOAD_REASONS,
    BreakerOpen,
    PermanentError,
    Reason,
    SourceUnavailable,
)
from fileserver.events import TalkEvent, parse_event
from fileserver.metrics import Metrics, get_metrics
from fileserver.pipeline import Outcome, Result
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, Repository
from fileserver.retry import DependencyRetry, RetryPolicy
from fileserver.text import storable_text

log = logging.getLogger("fileserver.events")
T = TypeVar("T")


class Health:
    """Whether shared dependencies are answering; the worker pauses intake while degraded."""

    def __init__(self) -> None:
        self._ok = asyncio.Event()
        self._ok.set()
        self.reason: str | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._trying = 0

    @contextlib.contextmanager
    def trying(self) -> Iterator[None]:
        """Around one event's calls to the dependencies. While intake is paused, the
        events in here are the only ones that can see a dependency come back; when the
        last of them leaves without having seen it (cancelled by a drain, held by the
        breaker), intake resumes so that the next event probes the dependency itself
        (and pauses it again if it is still down). Otherwise the pause would be a latch
        that nothing can open."""
        self._trying += 1
        try:
            yield
        finally:
            self._trying -= 1
            if not self._trying and not self.ok:
                log.warning(
                    "no event is retrying '%s' any more: the next one probes it", self.reason
                )
                self.recovered()

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
    with no success in between, the cause is probably systemic (a gateway serving
    404s or HTML error pages for everything, a gateway missing from the allowlist) and
    dead-lettering the rest of the topic would only move the damage. The breaker then
    *opens*: further events that fail for that reason are held (not dead-lettered, not
    committed) and retried every ``cooldown_s``; the first success closes it. A hold is
    bounded: an event still failing after ``max_hold_s`` of holding is dead-lettered all
    the same, so a cause nobody fixes (a range purged at the gateway) delays events
    instead of stalling the partition behind a window full of held ones for ever.

    Only reasons a retry can fix count: a failure decided by the record's bytes
    (:data:`~fileserver.errors.PAYLOAD_REASONS`) is always dead-lettered and neither
    counts nor resets the run. ``max_consecutive=0`` disables the breaker.
    """

    def __init__(
        self, max_consecutive: int = 100, cooldown_s: float = 60.0, max_hold_s: float = 900.0
    ) -> None:
        self.max_consecutive = max_consecutive
        self.cooldown_s = cooldown_s
        self.max_hold_s = max_hold_s
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
        if self.max_consecutive <= 0 or reason in PAYLOAD_REASONS:
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
            f"(FILESERVER_DLQ_MAX_CONSECUTIVE={self.max_consecutive})"
        )


def _source_url(record: SourceRecord) -> str | None:
    try:
        parsed = parse_event(record.value)
    except PermanentError:
        return None
    return parsed.file_path if isinstance(parsed, TalkEvent) else None


def _bug_summary(exc: BaseException, frames: int = 4) -> str:
    """``Type: message (at file:line in function <- ...)``: the innermost frames, enough
    to find the bug from the dead letter alone."""
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = " <- ".join(
        f"{f.filename.rsplit('/', 2)[-1] if '/' in f.filename else f.filename}:{f.lineno} "
        f"in {f.name}"
        for f in reversed(stack)
    )
    text = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return f"{text} (at {where})" if where else text


class Processor:
    """Applies the retry and dead-letter policy around one ingest function.

    ``hold=False`` (backfill): when the breaker would hold an event, :meth:`process`
    raises :class:`BreakerOpen` instead of waiting for the cause to go away.
    """

    def __init__(
        self,
        ingest: Callable[[SourceRecord], Awaitable[Result]],
        repo: Repository,
        dead_letters: DeadLetterSink,
        *,
        source_retry_s: float,
        internal_error_attempts: int = 5,
        retry: RetryPolicy | None = None,
        health: Health | None = None,
        breaker: DeadLetterLimit | None = None,
        hold: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self._ingest = ingest
        self._repo = repo
        self._dead_letters = dead_letters
        self._source_retry_s = source_retry_s
        self._internal_error_attempts = max(1, internal_error_attempts)
        self._retry = retry or RetryPolicy()
        self.health = health or Health()
        self.breaker = breaker or DeadLetterLimit(max_consecutive=0)
        self._hold_events = hold
        self._sleep = sleep
        self.metrics = metrics or get_metrics()
        #: The one loop that waits out a dependency outage (also used by backfill).
        self.dependencies = DependencyRetry(
            self._retry, self.health, self.metrics, sleep=lambda delay: self._sleep(delay)
        )

    async def process(
        self, record: SourceRecord, slot: AbstractAsyncContextManager[object] | None = None
    ) -> Result:
        """Ingest or dead-letter ``record``; returns only once the outcome is durable.

        ``slot`` (the worker's concurrency limit) is held while the event is worked on
        and given back while it is held by the breaker, so held events never take the
        places of events that can still succeed.
        """
        started = time.monotonic()
        held_since: float | None = None
        while True:
            async with slot or contextlib.nullcontext():
                await self.health.wait_ok()
                outcome = await self.attempt(record)
                if isinstance(outcome, Result):
                    if outcome.outcome not in (Outcome.SKIPPED, Outcome.ALREADY_FAILED):
                        self.breaker.success()
                    _log_result(outcome, time.monotonic() - started, self.metrics)
                    return outcome
                if self.breaker.allow(outcome.reason.value):
                    return await self.dead_letter(
                        record, outcome.reason, outcome.detail, started=started
                    )
                now = time.monotonic()
                held_since = now if held_since is None else held_since
                if now - held_since >= self.breaker.max_hold_s:
                    detail = (
                        f"{outcome.detail}; held {now - held_since:.0f}s by the open "
                        "dead-letter breaker "
                        f"(FILESERVER_DLQ_BREAKER_MAX_HOLD_S={self.breaker.max_hold_s:g})"
                    )
                    return await self.dead_letter(record, outcome.reason, detail, started=started)
            await self._hold(record, outcome)

    async def attempt(self, record: SourceRecord) -> Result | PermanentError:
        """Ingest ``record`` with the retry policy; the result, or why it can never succeed.

        Retryable source errors are retried for ``source_retry_s`` and then reported as
        ``source_unavailable``; dependency outages are retried without limit; a bug is
        retried ``internal_error_attempts`` times in all, then reported as
        ``internal_error``.
        """
        return await self.retrying(record, lambda: self._ingest(record))

    async def retrying(
        self,
        record: SourceRecord,
        step: Callable[[], Awaitable[T]],
        *,
        retry_bugs: bool = True,
    ) -> T | PermanentError:
        """Run ``step`` (work on ``record``) under the policy of :meth:`attempt`: its value,
        or the :class:`PermanentError` that ends it. ``retry_bugs=False``: an unexpected
        exception is raised at once (backfill ``--verify`` reports it as an error)."""
        with self.health.trying():
            started = time.monotonic()
            tries = bugs = 0
            while True:
                tries += 1
                try:
                    return await self.dependencies.call(step, what=record.source)
                except PermanentError as exc:
                    return exc
                except SourceUnavailable as exc:
                    if time.monotonic() - started >= self._source_retry_s:
                        return PermanentError(
                            Reason.SOURCE_UNAVAILABLE,
                            f"gave up after {tries} attempts in FILESERVER_SOURCE_RETRY_S="
                            f"{self._source_retry_s:g}s; last error: {exc.detail}",
                        )
                    delay = self._retry.delay(tries, exc.retry_after)
                    log.info(
                        "retrying %s in %.2fs (attempt %d): %s", record.source, delay, tries, exc
                    )
                    self.metrics.retried("source")
                    await self._sleep(delay)
                except Exception as exc:  # a bug: bounded retries, then a dead letter
                    if not retry_bugs:
                        raise
                    bugs += 1
                    self.metrics.retried("unexpected")
                    if bugs >= self._internal_error_attempts:
                        log.exception(
                            "unexpected error on %s (attempt %d of "
                            "FILESERVER_INTERNAL_ERROR_ATTEMPTS=%d): dead-lettering it",
                            record.source,
                            bugs,
                            self._internal_error_attempts,
                        )
                        return PermanentError(
                            Reason.INTERNAL_ERROR,
                            f"{_bug_summary(exc)}; {bugs} attempts "
                            f"(FILESERVER_INTERNAL_ERROR_ATTEMPTS={self._internal_error_attempts})",
                        )
                    log.exception(
                        "unexpected error on %s (attempt %d), will retry", record.source, bugs
                    )
                    await self._sleep(self._retry.delay(bugs))

    async def _hold(self, record: SourceRecord, exc: PermanentError) -> None:
        """The breaker is open: keep the event (uncommitted) and try it again later."""
        if not self._hold_events:
            raise BreakerOpen(exc.reason.value, self.breaker.describe())
        self.metrics.retried("breaker")
        log.error(
            "holding %s (%s): %s; retrying it every %gs (FILESERVER_DLQ_BREAKER_COOLDOWN_S)",
            record.source,
            exc.reason.value,
            self.breaker.describe(),
            self.breaker.cooldown_s,
        )
        await self._sleep(self.breaker.cooldown_s)

    async def dead_letter(
        self, record: SourceRecord, reason: Reason, detail: str, *, started: float | None = None
    ) -> Result:
        """Publish the dead letter, then record the failure row (one row per offset).

        The record is published once per call; only a crash between the publish and
        the row can repeat it on redelivery (at-least-once on the dead-letter topic).
        The row's text columns are made storable (the original bytes stay in
        ``payload``); an error that is not an outage is retried like one, with the
        row's detail cut to plain ASCII after the first such error.
        """
        with self.health.trying():
            return await self._dead_letter(record, reason, detail, started)

    async def _dead_letter(
        self, record: SourceRecord, reason: Reason, detail: str, started: float | None
    ) -> Result:
        detail = storable_text(detail, max_chars=4000)
        published = False
        plain = False

        async def write() -> None:
            nonlocal published
            if not await self._repo.has_failure(record.topic, record.partition, record.offset):
                if not published:
                    await self._dead_letters.publish(record, reason.value, detail)
                    published = True
                await self._repo.insert_failure(
                    self._failure_row(record, reason, detail, plain=plain)
                )

        errors = 0
        while True:
            try:
                await self.dependencies.call(write, what=f"the dead letter of {record.source}")
                break
            except Exception as exc:  # never lose the dead letter: retry, simplest row next
                log.exception("cannot record the dead letter of %s; retrying", record.source)
                errors += 1
                plain = True
                self.health.degraded(f"dead letter of {record.source}: {type(exc).__name__}")
                self.metrics.retried("unexpected")
                await self._sleep(self._retry.delay(errors))
        result = Result(Outcome.DEAD_LETTERED, record, reason=reason.value, detail=detail)
        _log_result(result, None if started is None else time.monotonic() - started, self.metrics)
        return result

    @staticmethod
    def _failure_row(
        record: SourceRecord, reason: Reason, detail: str, *, plain: bool
    ) -> NewFailure:
        """The ``ingest_failures`` row; ``plain``: ASCII detail and no URL, the row that
        can be written whatever the text was."""
        source_url = None if plain else _source_url(record)
        if plain:
            detail = detail.encode("ascii", "backslashreplace").decode("ascii")
        return NewFailure(
            kafka_topic=record.topic,
            kafka_partition=record.partition,
            kafka_offset=record.offset,
            reason=reason.value,
            detail=detail,
            source_url=None if source_url is None else storable_text(source_url),
            payload=record.value,
        )


def _log_result(result: Result, elapsed_s: float | None, metrics: Metrics) -> None:
    """Count the outcome and write its one structured log line (fields for JSON logs)."""
    metrics.outcome(
        result.outcome.value,
        reason=result.reason,
        skipped_type=result.skipped_type,
        elapsed_s=elapsed_s,
    )
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
