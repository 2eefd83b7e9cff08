"""The checks every command runs before it starts: is the database reachable and
migrated, is the bucket there. Each failure is a :class:`ConfigError` naming the
setting to fix (exit status 2), the same words for the worker, backfill and reconcile.
"""

from __future__ import annotations

from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.repository import Repository
from fileserver.settings import Settings, redact_url
from fileserver.storage import ObjectStore


async def check_database(settings: Settings, repo: Repository) -> None:
    """The database answers and has fileserver's tables."""
    url = redact_url(settings.database_url)
    try:
        await repo.ping()
    except DependencyUnavailable as exc:
        raise ConfigError(
            f"cannot reach the database at FILESERVER_DATABASE_URL={url}: {exc.detail}"
        ) from None
    except Exception as exc:
        raise ConfigError(f"database at FILESERVER_DATABASE_URL={url} refused: {exc}") from None
    try:
        await repo.check_schema()
    except Exception as exc:
        raise ConfigError(
            "the database has no fileserver tables: run `fileserver migrate` "
            f"(FILESERVER_DATABASE_URL={url}): {type(exc).__name__}"
        ) from None


async def check_bucket(settings: Settings, store: ObjectStore) -> None:
    """The bucket exists and the store answers."""
    try:
        await store.check_bucket()
    except DependencyUnavailable as exc:
        raise ConfigError(
            f"cannot use bucket FILESERVER_S3_BUCKET={settings.s3_bucket} at "
            f"FILESERVER_S3_ENDPOINT_URL={settings.s3_endpoint_url or '(AWS)'}: {exc.detail}"
        ) from None


async def check_stores(settings: Settings, repo: Repository, store: ObjectStore) -> None:
    """:func:`check_database`, then :func:`check_bucket`."""
    await check_database(settings, repo)
    await check_bucket(settings, store)
