"""RetryPolicy: exponential backoff with full jitter, capped, Retry-After wins.
DependencyRetry: the one loop that waits out a dependency outage."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from fileserver.errors import DependencyUnavailable, PermanentError, Reason, SourceUnavailable
from fileserver.processor import Health
from fileserver.retry import DependencyRetry, RetryPolicy


@pytest.fixture
def ceilings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Replace the jitter by its upper bound and record the (low, high) asked for."""
    calls: list[tuple[float, float]] = []

    def upper(low: float, high: float) -> float:
        calls.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", upper)  # fileserver.retry uses the module
    return calls


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RetryPolicy(), [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]),
        (RetryPolicy(initial_s=1.0, max_s=5.0), [1, 2, 4, 5, 5, 5]),
        (RetryPolicy(initial_s=0.5, max_s=100.0, multiplier=3.0), [0.5, 1.5, 4.5, 13.5, 40.5, 100]),
        (RetryPolicy(initial_s=2.0, max_s=2.0), [2, 2, 2]),
        (RetryPolicy(initial_s=1.0, max_s=10.0, multiplier=1.0), [1, 1, 1]),
    ],
)
def test_ceiling_grows_and_is_capped(
    ceilings: list[tuple[float, float]], policy: RetryPolicy, expected: list[float]
) -> None:
    got = [policy.delay(attempt) for attempt in range(1, len(expected) + 1)]
    assert got == pytest.approx(expected)
    assert all(b == pytest.approx(a * 2) for a, b in ceilings)  # low = ceiling / 2
    assert got == sorted(got)  # never shrinks


@pytest.mark.parametrize("attempt", [0, -3])
def test_attempt_before_first_uses_initial(
    ceilings: list[tuple[float, float]], attempt: int
) -> None:
    assert RetryPolicy(initial_s=0.2).delay(attempt) == pytest.approx(0.2)


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 20, 100, 1023])
def test_jitter_stays_within_half_ceiling_and_ceiling(attempt: int) -> None:
    policy = RetryPolicy()
    ceiling = min(policy.max_s, policy.initial_s * policy.multiplier ** (attempt - 1))
    random.seed(attempt)
    samples = [policy.delay(attempt) for _ in range(500)]
    assert all(ceiling / 2 <= s <= ceiling for s in samples)
    assert len(set(samples)) > 1  # it is jittered
    # full jitter over [ceiling/2, ceiling]: both halves of the range are used
    assert min(samples) < ceiling * 0.6
    assert max(samples) > ceiling * 0.9


@pytest.mark.parametrize("attempt", [1024, 1025, 10**6])
def test_very_many_attempts_stay_capped(attempt: int) -> None:
    # the processor retries a dependency outage without limit: any attempt number must work
    delay = RetryPolicy().delay(attempt)
    assert 15.0 <= delay <= 30.0
    assert math.isfinite(delay)


@pytest.mark.parametrize(
    ("retry_after", "attempt", "expected"),
    [
        (0.0, 1, 0.0),
        (0.0, 50, 0.0),
        (7.5, 1, 7.5),
        (7.5, 30, 7.5),  # wins over the (larger) backoff too
        (29.99, 3, 29.99),
        (30.0, 1, 30.0),
        (120.0, 1, 30.0),  # capped at max_s
        (math.inf, 1, 30.0),
    ],
)
def test_retry_after_wins_capped(retry_after: float, attempt: int, expected: float) -> None:
    assert RetryPolicy().delay(attempt, retry_after) == expected


@pytest.mark.parametrize("retry_after", [None, -1.0, math.nan])
def test_unusable_retry_after_falls_back_to_backoff(
    ceilings: list[tuple[float, float]], retry_after: float | None
) -> None:
    assert RetryPolicy().delay(3, retry_after) == pytest.approx(0.8)
    assert len(ceilings) == 1


# --- DependencyRetry -----------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.retries: Counter[str] = Counter()

    def retried(self, dependency: str) -> None:
        self.retries[dependency] += 1


class _Sleeps:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.delays: list[float] = []
        self.ok_at_sleep: list[bool] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.ok_at_sleep.append(self.health.ok)


def _retrying(
    policy: RetryPolicy | None = None,
) -> tuple[DependencyRetry, Health, _Counter, _Sleeps]:
    health, counter = Health(), _Counter()
    sleeps = _Sleeps(health)
    retry = DependencyRetry(
        policy or RetryPolicy(initial_s=1.0, max_s=4.0), health, counter, sleep=sleeps
    )
    return retry, health, counter, sleeps


def _script(*steps: BaseException | str) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def call() -> str:
        step = steps[len(calls)]
        calls.append(len(calls))
        if isinstance(step, BaseException):
            raise step
        return step

    return calls, call


async def test_an_outage_is_retried_until_the_call_returns(
    ceilings: list[tuple[float, float]],
) -> None:
    retry, health, counter, sleeps = _retrying()
    down = [DependencyUnavailable("postgres", "refused")] * 3
    calls, call = _script(*down, DependencyUnavailable("s3", "SlowDown", retry_after=2.5), "done")
    assert await retry.call(call, what="a look-up") == "done"
    assert len(calls) == 5
    assert sleeps.delays == [1.0, 2.0, 4.0, 2.5], "the policy's backoff; Retry-After wins"
    assert sleeps.ok_at_sleep == [False] * 4, "degraded while it waits"
    assert health.ok and health.reason is None, "recovered once the call went through"
    assert counter.retries == Counter({"postgres": 3, "s3": 1}), "counted per dependency"


async def test_health_names_the_dependency_while_it_waits() -> None:
    retry, health, _, _ = _retrying()
    reasons: list[str | None] = []

    async def sleep(delay: float) -> None:
        reasons.append(health.reason)

    retry._sleep = sleep
    _, call = _script(DependencyUnavailable("postgres", "too many clients"), "ok")
    await retry.call(call, what="x")
    assert reasons == ["postgres: too many clients"]


@pytest.mark.parametrize(
    "error",
    [
        SourceUnavailable("HTTP 503"),
        PermanentError(Reason.SOURCE_NOT_FOUND, "404"),
        KeyError("a bug"),
    ],
)
async def test_other_exceptions_are_the_callers(error: Exception) -> None:
    retry, health, counter, sleeps = _retrying()
    health.degraded("s3: down")  # another call's outage: a failure here says nothing of it
    calls, call = _script(error, "never")
    with pytest.raises(type(error)) as caught:
        await retry.call(call, what="x")
    assert caught.value is error
    assert len(calls) == 1 and sleeps.delays == [] and not counter.retries
    assert not health.ok, "not recovered by a call that did not go through"


async def test_a_call_that_goes_through_recovers_health() -> None:
    retry, health, _, sleeps = _retrying()
    health.degraded("s3: down")  # e.g. another event's outage: this call reached it
    _, call = _script("ok")
    assert await retry.call(call, what="x") == "ok"
    assert health.ok and sleeps.delays == []
