"""Object storage (S3, MinIO, SeaweedFS) through boto3, off the event loop.

Every upload is integrity-checked by the store: a single PUT carries ``Content-MD5``;
a multipart upload (files above the multipart threshold) carries ``Content-MD5`` on
each part. botocore errors are translated here into the fileserver error tree: all of
them are systemic (:class:`DependencyUnavailable`), since no object-store failure
says anything about the event itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from fileserver.errors import DependencyUnavailable

if TYPE_CHECKING:
    from fileserver.s3_put import S3Putter

log = logging.getLogger(__name__)
T = TypeVar("T")
CONTENT_TYPE = "audio/mpeg"
FAST_PUT_MAX_BYTES = 1024 * 1024  # read whole into memory for the event-loop putter


@dataclass(frozen=True)
class StoredObject:
    """What the store says about an object."""

    key: str
    size: int
    metadata: dict[str, str]


def content_md5(digest: bytes) -> str:
    """The ``Content-MD5`` header value of an md5 digest (base64)."""
    return base64.b64encode(digest).decode("ascii")


def s3_unavailable(code: str, message: str, bucket: str) -> DependencyUnavailable:
    """The error for an S3 error response, worded alike on every transport."""
    return DependencyUnavailable("s3", f"{code} on bucket {bucket!r}: {message}")


@contextmanager
def s3_errors(bucket: str) -> Iterator[None]:
    """Translate botocore errors raised inside the block into :class:`DependencyUnavailable`."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise s3_unavailable(err.get("Code", "?"), err.get("Message", ""), bucket) from None
    except BotoCoreError as exc:
        raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None


class ObjectStore:
    """One bucket, one boto3 client (thread-safe), one bounded thread pool.

    With a ``putter`` (``FILESERVER_S3_TRANSPORT=aiohttp`` or ``http11``), objects up to
    :data:`FAST_PUT_MAX_BYTES` are PUT on the event loop by
    :class:`~fileserver.s3_put.S3Putter` instead of boto3; the rest is unchanged.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        executor: ThreadPoolExecutor,
        *,
        multipart_threshold: int = 16 * 1024 * 1024,
        chunk_size: int = 8 * 1024 * 1024,
        putter: S3Putter | None = None,
    ) -> None:
        self._client = client
        self.bucket = bucket
        self._executor = executor
        self._threshold = multipart_threshold
        self._chunk = chunk_size
        self._putter = putter

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        with s3_errors(self.bucket):
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )

    async def check_bucket(self) -> None:
        """Raise :class:`DependencyUnavailable` unless the bucket exists and is reachable."""
        await self._run(self._client.head_bucket, Bucket=self.bucket)

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        """Upload ``content`` (bytes, or a file) under ``key``; the store verifies every
        byte against its md5."""
        if isinstance(content, bytes):
            size = len(content)
            if size > self._threshold:
                raise ValueError("in-memory content above the multipart threshold")
        else:
            size = content.stat().st_size
        if self._putter is not None and size <= min(FAST_PUT_MAX_BYTES, self._threshold):
            body = content if isinstance(content, bytes) else content.read_bytes()
            await self._putter.put(key, body, md5_hex, CONTENT_TYPE, metadata)
        elif size <= self._threshold:
            await self._run(self._put_single, key, content, md5_hex, metadata)
        else:
            assert isinstance(content, Path)
            await self._run(self._put_multipart, key, content, metadata)

    def _put_single(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        with contextlib.ExitStack() as stack:
            body: bytes | BinaryIO = (
                content if isinstance(content, bytes) else stack.enter_context(content.open("rb"))
            )
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentMD5=content_md5(bytes.fromhex(md5_hex)),
                ContentType=CONTENT_TYPE,
                Metadata=metadata,
            )

    def _put_multipart(self, key: str, path: Path, metadata: dict[str, str]) -> None:
        upload = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=CONTENT_TYPE, Metadata=metadata
        )
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with path.open("rb") as f:
                number = 1
                while chunk := f.read(self._chunk):
                    resp = self._client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentMD5=content_md5(hashlib.md5(chunk, usedforsecurity=False).digest()),
                    )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                    number += 1
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort multipart upload of %s: %s", key, exc)
            raise

    async def head(self, key: str) -> StoredObject | None:
        """The object's size and metadata, or ``None`` when it does not exist."""
        return await self._run(self._head, key)

    def _head(self, key: str) -> StoredObject | None:
        return head_object(self._client, self.bucket, key)


def head_object(client: Any, bucket: str, key: str) -> StoredObject | None:
    """HEAD an object (blocking): its size and metadata, or ``None`` when it is missing."""
    try:
        resp = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return StoredObject(key=key, size=int(resp["ContentLength"]), metadata=resp["Metadata"])
