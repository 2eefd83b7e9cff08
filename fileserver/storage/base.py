"""What every S3 transport of :mod:`fileserver.storage` shares (no I/O): the objects'
content type, the ``Content-MD5`` header, what the store says about an object, and the
translation of S3 errors into :class:`~fileserver.errors.DependencyUnavailable`.

No object-store failure says anything about the event itself, so every one of them is
systemic.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from fileserver.errors import DependencyUnavailable

CONTENT_TYPE = "audio/mpeg"


@dataclass(frozen=True)
class StoredObject:
    """What the store says about an object (HEAD): ``etag`` as :func:`etag_value`."""

    key: str
    size: int
    metadata: dict[str, str]
    etag: str = field(default="")


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: ``etag`` as :func:`etag_value`."""

    key: str
    size: int
    etag: str
    last_modified: datetime


def etag_value(etag: object) -> str:
    """An ETag without its quotes, in lower case (``""`` when there is none). It is the
    object's md5 only for a single PUT without SSE-KMS or SSE-C."""
    return str(etag or "").strip('"').lower()


def content_md5(digest: bytes) -> str:
    """The ``Content-MD5`` header value of an md5 digest (base64)."""
    return base64.b64encode(digest).decode("ascii")


class S3ErrorResponse(DependencyUnavailable):
    """The store answered with an error: ``code`` is S3's (``AccessDenied``,
    ``SignatureDoesNotMatch``, ... or ``HTTP <status>`` when the body names none),
    ``status`` the HTTP status when known (0 otherwise) and ``region`` the bucket's
    region when the answer says it."""

    def __init__(
        self, code: str, message: str, bucket: str, *, status: int = 0, region: str = ""
    ) -> None:
        super().__init__("s3", f"{code} on bucket {bucket!r}: {message}")
        self.code = code
        self.status = status
        self.region = region


def s3_unavailable(code: str, message: str, bucket: str) -> S3ErrorResponse:
    """The error for an S3 error response, worded alike on every transport."""
    return S3ErrorResponse(code, message, bucket)


@contextmanager
def s3_errors(bucket: str) -> Iterator[None]:
    """Translate botocore errors raised inside the block into :class:`DependencyUnavailable`."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise s3_unavailable(err.get("Code", "?"), err.get("Message", ""), bucket) from None
    except (ConnectTimeoutError, ReadTimeoutError) as exc:
        setting = (
            "FILESERVER_CONNECT_TIMEOUT_S"
            if isinstance(exc, ConnectTimeoutError)
            else "FILESERVER_READ_TIMEOUT_S"
        )
        raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc} ({setting})") from None
    except BotoCoreError as exc:
        raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None
