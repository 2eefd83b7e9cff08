"""The one error tree of fileserver.

Adapters translate library exceptions into these at their boundary; the retry and
dead-letter policy (:mod:`fileserver.processor`) is the only code that decides what
happens next::

    FileserverError
    ├── ConfigError                 a setting is missing or wrong (names the setting)
    ├── RetryableError              transient: the same call may succeed later
    │   ├── SourceUnavailable       one recording's source (HTTP 5xx/429, timeouts, refused)
    │   │                           -> retried within FILESERVER_SOURCE_RETRY_S, then the
    │   │                              event is dead-lettered as ``source_unavailable``
    │   └── DependencyUnavailable   a shared dependency (S3, Postgres, the dead-letter topic)
    │                               -> retried without limit, never dead-lettered; the
    │                                  worker stops taking new events meanwhile
    └── PermanentError(reason)      this event can never succeed -> dead letter with reason

Any other exception is a bug: the processor retries it FILESERVER_INTERNAL_ERROR_ATTEMPTS
times, then dead-letters the event as ``internal_error`` with a traceback summary.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Dead-letter reasons. The strings are part of the operator contract."""

    MALFORMED_JSON = "malformed_json"
    INVALID_EVENT = "invalid_event"
    SOURCE_FORBIDDEN = "source_forbidden"
    SOURCE_NOT_FOUND = "source_not_found"
    SOURCE_UNAVAILABLE = "source_unavailable"
    TOO_LARGE = "too_large"
    MD5_MISMATCH = "md5_mismatch"
    INVALID_AUDIO = "invalid_audio"
    DURATION_OUT_OF_RANGE = "duration_out_of_range"
    INTERNAL_ERROR = "internal_error"


#: Reasons decided by the record's bytes alone (or by a bug on them): retrying the same
#: record can never change them, so the dead-letter breaker neither counts nor holds them.
PAYLOAD_REASONS = frozenset({Reason.MALFORMED_JSON, Reason.INVALID_EVENT, Reason.INTERNAL_ERROR})


class FileserverError(Exception):
    """Base of every error fileserver raises on purpose."""


class ConfigError(FileserverError):
    """A setting is missing or invalid; the message names the setting to fix."""


class RetryableError(FileserverError):
    """A transient failure: the same step may succeed if tried again."""

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class SourceUnavailable(RetryableError):
    """The recording's HTTP source failed in a way that may heal (5xx, 429, timeout)."""


class DependencyUnavailable(RetryableError):
    """S3, Postgres or the dead-letter topic is unreachable: systemic, never dead-lettered."""

    def __init__(self, dependency: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{dependency}: {detail}", retry_after=retry_after)
        self.dependency = dependency


class PermanentError(FileserverError):
    """The event can never be ingested; it becomes a dead letter with ``reason``."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class BreakerOpen(FileserverError):
    """The dead-letter breaker is open and the caller asked not to hold events
    (``fileserver backfill`` stops instead of waiting; the worker holds)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
