"""Retrying: the backoff policy, and the one loop that waits out a dependency outage.

:class:`RetryPolicy` is the backoff (exponential with full jitter, honouring a server's
Retry-After; no I/O). :class:`DependencyRetry` is the only code that retries a call while
a shared dependency is down: the processor's ingest and dead-letter steps, backfill's
batched look-ups and ``--verify`` go through it. The processor keeps the other two
budgets (a source for ``FILESERVER_SOURCE_RETRY_S``, a bug for
``FILESERVER_INTERNAL_ERROR_ATTEMPTS``) around it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fileserver.errors import DependencyUnavailable

log = logging.getLogger("fileserver.events")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before attempt ``n`` (1-based) of a retryable step."""

    initial_s: float = 0.2
    max_s: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The pause before the next attempt; ``retry_after`` wins when given (capped)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_s)
        exponent = min(max(0, attempt - 1), 64)  # past the cap anyway; avoids OverflowError
        ceiling = min(self.max_s, self.initial_s * self.multiplier**exponent)
        return random.uniform(ceiling / 2, ceiling)


class HealthState(Protocol):
    """What the retry loop tells :class:`fileserver.processor.Health`."""

    def degraded(self, reason: str) -> None: ...

    def recovered(self) -> None: ...


class RetryCounter(Protocol):
    """What the retry loop tells :class:`fileserver.metrics.Metrics`."""

    def retried(self, dependency: str) -> None: ...


class DependencyRetry:
    """``call(fn)`` runs ``fn`` until it returns, for as long as a dependency is down.

    The shape of arroyo's ``RetryPolicy.call``, with only one exception retried:
    :class:`DependencyUnavailable` (S3, Postgres, the dead-letter topic). Each one turns
    ``health`` *degraded* (the worker stops taking new events), counts a retry for its
    dependency and waits the policy's backoff, or the ``Retry-After`` it carries. A call
    that returns turns ``health`` back *ok*: whatever it needed answered. Any other
    exception is the caller's to handle and goes through unchanged.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        health: HealthState,
        metrics: RetryCounter,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.health = health
        self.metrics = metrics
        self._sleep = sleep

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """``await fn()``, retried without limit while it raises DependencyUnavailable;
        ``what`` names the work in the log line of each retry."""
        attempt = 0
        while True:
            attempt += 1
            try:
                value = await fn()
            except DependencyUnavailable as exc:
                self.health.degraded(str(exc))
                delay = self.policy.delay(attempt, exc.retry_after)
                log.info("retrying %s in %.2fs (attempt %d): %s", what, delay, attempt, exc)
                self.metrics.retried(exc.dependency)
                await self._sleep(delay)
            else:
                self.health.recovered()
                return value
