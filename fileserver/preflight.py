"""The checks every command runs before it starts: is the database reachable and
migrated, is the bucket there, and, on the event-loop PUT path, does a signed PUT go
through. Each failure is a :class:`ConfigError` naming the setting to fix, the same
words for the worker, backfill and reconcile: exit status 2, or 3 when the dependency
did not answer (:func:`fileserver.exits.unreachable`).
"""

from __future__ import annotations

import hashlib
import logging

from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.repository import Repository
from fileserver.settings import Settings, redact_url
from fileserver.storage import ObjectStore
from fileserver.storage.base import S3ErrorResponse
from fileserver.storage.s3_put import PREFLIGHT_BODY, PREFLIGHT_KEY

log = logging.getLogger(__name__)

#: S3 error codes of a request signed for another region than the bucket's (a 301
#: ``PermanentRedirect`` from a regional endpoint, a 400 from the global one).
_REGION_CODES = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "TemporaryRedirect",
        "IllegalLocationConstraintException",
        "InvalidRegion",
        "HTTP 301",
        "HTTP 307",
    }
)
_SIGNATURE_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "RequestTimeTooSkewed",
    }
)


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
    """The bucket exists and the store answers. A store that answers "no such bucket" is
    a configuration error (exit status 2); one that does not answer is unreachable (3)."""
    try:
        await store.check_bucket()
        return
    except DependencyUnavailable as exc:
        message = (
            f"cannot use bucket FILESERVER_S3_BUCKET={settings.s3_bucket} at "
            f"FILESERVER_S3_ENDPOINT_URL={settings.s3_endpoint_url or '(AWS)'}: {exc.detail}"
        )
        if getattr(exc, "code", "") not in ("404", "NoSuchBucket"):
            raise ConfigError(message) from None  # keeps the outage as its context: 3
    raise ConfigError(f"{message} (no such bucket: create it, or fix FILESERVER_S3_BUCKET)")


def _put_hint(settings: Settings, exc: S3ErrorResponse, region: str) -> str:
    """What to change when the store refused the probe PUT."""
    transport = f"FILESERVER_S3_TRANSPORT={settings.s3_transport}"
    if exc.code in _REGION_CODES:
        where = f" (the store says the bucket is in {exc.region!r})" if exc.region else ""
        return (
            f"the PUT was signed for region {region!r}{where}: set FILESERVER_S3_REGION to "
            "the bucket's region (boto3's HeadBucket follows the store's redirect, so the "
            "bucket check passed; the PUTs of every event would not)"
        )
    if exc.code in _SIGNATURE_CODES:
        return (
            "the store refused the request's signature or credentials although boto3's "
            "HeadBucket passed with the same ones: check the clock (RequestTimeTooSkewed), "
            "FILESERVER_S3_REGION and FILESERVER_S3_ENDPOINT_URL (a gateway that rewrites "
            f"the Host breaks the signature); if they are right, set "
            f"FILESERVER_S3_TRANSPORT=boto3 (botocore's signer) instead of {transport}"
        )
    if exc.code == "AccessDenied":
        return (
            "the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role) may not "
            f"PUT into the bucket: grant s3:PutObject on arn:aws:s3:::{settings.s3_bucket}/*"
        )
    return f"every event's upload would fail the same way ({transport})"


async def check_fast_put(settings: Settings, store: ObjectStore) -> None:
    """One signed PUT and DELETE of :data:`~fileserver.storage.s3_put.PREFLIGHT_KEY`
    through the event-loop PUT path (nothing without one: ``FILESERVER_S3_TRANSPORT=boto3``).

    A wrong region, a signature or credentials the store refuses, or a missing
    ``s3:PutObject`` fail here, at start, with the setting to change, instead of pausing
    intake on the first event (the bucket check, on boto3, passes all three). A DELETE
    the credentials may not do is only logged: the worker never deletes.
    """
    putter = store.putter
    if putter is None:
        return
    bucket = f"FILESERVER_S3_BUCKET={settings.s3_bucket}"
    md5_hex = hashlib.md5(PREFLIGHT_BODY, usedforsecurity=False).hexdigest()
    failure: S3ErrorResponse | None = None
    try:
        await putter.put(PREFLIGHT_KEY, PREFLIGHT_BODY, md5_hex, "text/plain", {})
    except DependencyUnavailable as exc:
        if isinstance(exc, S3ErrorResponse) and exc.status < 500:
            failure = exc  # refused: a configuration error (exit status 2)
        else:  # no answer, or the store is failing: unreachable (exit status 3)
            raise ConfigError(
                f"a signed PUT of {PREFLIGHT_KEY!r} into {bucket} through "
                f"FILESERVER_S3_TRANSPORT={settings.s3_transport} at {putter.prefix} "
                f"failed: {exc.detail} (FILESERVER_S3_ENDPOINT_URL="
                f"{settings.s3_endpoint_url or '(AWS)'})"
            ) from None
    if failure is not None:
        raise ConfigError(
            f"a signed PUT of {PREFLIGHT_KEY!r} into {bucket} through "
            f"FILESERVER_S3_TRANSPORT={settings.s3_transport} was refused: {failure.detail}. "
            + _put_hint(settings, failure, putter.region)
        )
    try:
        await putter.delete(PREFLIGHT_KEY)
    except DependencyUnavailable as exc:
        log.warning(
            "preflight: could not delete the probe object %r from bucket %s (%s); it is "
            "overwritten at the next start, and the worker itself never deletes",
            PREFLIGHT_KEY,
            settings.s3_bucket,
            exc.detail,
        )


async def check_stores(settings: Settings, repo: Repository, store: ObjectStore) -> None:
    """:func:`check_database`, :func:`check_bucket`, then :func:`check_fast_put`."""
    await check_database(settings, repo)
    await check_bucket(settings, store)
    await check_fast_put(settings, store)
