"""The exit statuses every ``fileserver`` verb shares, and which error means which.

Pure and light (no I/O, nothing heavy imported): ``fileserver --help`` prints :data:`TABLE`.
"""

from __future__ import annotations

from fileserver.errors import ConfigError, DependencyUnavailable

OK = 0
#: The verb ran but did not finish its work: dead letters left (redrive, backfill),
#: inconsistencies left (reconcile), an unexpected error.
INCOMPLETE = 1
#: A usage error (argparse's own status) or a setting that is missing or wrong.
USAGE = 2
#: A dependency (Postgres, S3, Kafka) cannot be reached; the message names its setting.
UNREACHABLE = 3
#: ``fileserver backfill`` stopped by the dead-letter breaker (run the printed resume command).
BREAKER = 4
#: Ctrl-C / SIGINT (128 + 2, as shells report it).
INTERRUPTED = 130

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "done"),
    (INCOMPLETE, "work incomplete (dead letters or inconsistencies left, an unexpected error)"),
    (USAGE, "usage or configuration error (the message names the option or setting)"),
    (UNREACHABLE, "a dependency unreachable: Postgres, S3 or Kafka (names the setting)"),
    (BREAKER, "stopped by the dead-letter breaker (backfill; run the printed resume command)"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def meaning(code: int) -> str:
    """What exit status ``code`` means, as :data:`TABLE` says (``"unknown"`` for another)."""
    return dict(TABLE).get(code, "unknown")


def epilog() -> str:
    """The exit-status table as ``fileserver --help`` prints it."""
    rows = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in TABLE)
    return f"exit status (every command):\n{rows}"


#: The settings that say where each dependency is (named in the one-line error).
SETTINGS_OF: dict[str, tuple[str, ...]] = {
    "postgres": ("database_url",),
    "s3": ("s3_endpoint_url", "s3_bucket"),
    "kafka": ("kafka_bootstrap",),
}


def unreachable(exc: BaseException) -> DependencyUnavailable | None:
    """The :class:`DependencyUnavailable` behind ``exc``, if that is what it is.

    The start-up checks (:mod:`fileserver.preflight`, serve's) re-raise an unreachable
    database or bucket as a :class:`ConfigError` naming the setting (``raise ... from
    None``, which keeps the original as ``__context__``): that is still exit status 3."""
    if isinstance(exc, DependencyUnavailable):
        return exc
    if isinstance(exc, ConfigError) and isinstance(exc.__context__, DependencyUnavailable):
        return exc.__context__
    return None


def status_for(exc: BaseException) -> int:
    """The exit status a verb that raised ``exc`` ends with."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if unreachable(exc) is not None:
        return UNREACHABLE
    if isinstance(exc, ConfigError):
        return USAGE
    return INCOMPLETE
