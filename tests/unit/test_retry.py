"""RetryPolicy: exponential backoff with full jitter, capped, Retry-After wins."""

from __future__ import annotations

import math
import random

import pytest

from fileserver.retry import RetryPolicy


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
