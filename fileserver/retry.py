"""Backoff policy: exponential with full jitter, honouring a server's Retry-After. No I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
