"""Object storage (S3, MinIO, SeaweedFS) through boto3, off the event loop.

Every upload is integrity-checked by the store: a single PUT carries ``Content-MD5``;
a multipart upload (files above the multipart threshold) carries ``Content-MD5`` on
each part. botocore errors are translated into the fileserver error tree
(:func:`~fileserver.storage.base.s3_errors`): all of them are systemic
(:class:`DependencyUnavailable`), since no object-store failure says anything about the
event itself. Besides uploads, :class:`ObjectStore` lists the bucket in key order and
moves objects (``fileserver reconcile``).

Every boto3 call has a deadline of its own (:meth:`ObjectStore.deadline_s`): botocore's
``connect_timeout`` / ``read_timeout`` bound each socket operation, not the call, so a
store that accepts and trickles its answer a byte at a time would otherwise hold the
event (and its executor thread) for as long as it likes. A call past its deadline
raises :class:`DependencyUnavailable` naming the settings; its thread is left to finish
on its own (botocore cannot be interrupted), and a multipart upload is aborted in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from fileserver.errors import DependencyUnavailable
from fileserver.storage.base import (
    CONTENT_TYPE,
    ListedObject,
    StoredObject,
    content_md5,
    etag_value,
    s3_errors,
)
from fileserver.storage.s3_put import S3Putter

log = logging.getLogger(__name__)
T = TypeVar("T")
FAST_PUT_MAX_BYTES = 1024 * 1024  # read whole into memory for the event-loop putter
#: The slowest upload a boto3 call waits for, on top of its connect and read timeouts
#: (a 16 MiB PUT gets 64 s more): bodies take time to send, answers should not.
MIN_UPLOAD_BYTES_PER_S = 256 * 1024
_BOTOCORE_DEFAULT_TIMEOUT_S = 60.0


class ObjectStore:
    """One bucket, one boto3 client (thread-safe), one bounded thread pool.

    With a ``putter`` (``FILESERVER_S3_TRANSPORT=http11``, the default, or ``aiohttp``),
    objects up to :data:`FAST_PUT_MAX_BYTES` are PUT on the event loop by
    :class:`~fileserver.storage.s3_put.S3Putter` instead of boto3; the rest is unchanged.

    ``timeout_s``, the deadline of a call without a body, defaults to the client's
    ``connect_timeout + read_timeout`` (FILESERVER_CONNECT_TIMEOUT_S and
    FILESERVER_READ_TIMEOUT_S, see ``runtime.make_s3_client``).
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
        timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self.bucket = bucket
        self._executor = executor
        self._threshold = multipart_threshold
        self._chunk = chunk_size
        self._putter = putter
        self._timeout_s = timeout_s if timeout_s is not None else _client_timeout_s(client)

    @property
    def putter(self) -> S3Putter | None:
        """The event-loop PUT path, when there is one (the preflight probes it)."""
        return self._putter

    def deadline_s(self, body_bytes: int = 0) -> float:
        """The most one boto3 call sending ``body_bytes`` may take, queueing for a thread
        included (a full pool of stuck threads must not stall events either)."""
        return self._timeout_s + body_bytes / MIN_UPLOAD_BYTES_PER_S

    async def _run(
        self, what: str, body_bytes: int, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """``fn(*args, **kwargs)`` in the executor within :meth:`deadline_s`."""
        loop = asyncio.get_running_loop()
        deadline_s = self.deadline_s(body_bytes)
        deadline = asyncio.timeout(deadline_s)
        with s3_errors(self.bucket):
            try:
                async with deadline:
                    return await loop.run_in_executor(
                        self._executor, functools.partial(fn, *args, **kwargs)
                    )
            except TimeoutError:
                if not deadline.expired():
                    raise
                settings = "FILESERVER_CONNECT_TIMEOUT_S + FILESERVER_READ_TIMEOUT_S"
                if body_bytes:
                    settings += f" + 1 s per {MIN_UPLOAD_BYTES_PER_S // 1024} KiB sent"
                raise DependencyUnavailable(
                    "s3",
                    f"{what} on bucket {self.bucket!r}: no complete answer within "
                    f"{deadline_s:g} s ({settings})",
                ) from None

    async def check_bucket(self) -> None:
        """Raise :class:`DependencyUnavailable` unless the bucket exists and is reachable."""
        await self._run("head_bucket", 0, self._client.head_bucket, Bucket=self.bucket)

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
            await self._run("put_object", size, self._put_single, key, content, md5_hex, metadata)
        else:
            assert isinstance(content, Path)
            await self._put_multipart(key, content, size, metadata)

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

    async def _put_multipart(
        self, key: str, path: Path, size: int, metadata: dict[str, str]
    ) -> None:
        """One boto3 call at a time, each with its own deadline; aborted on any failure."""
        upload = await self._run(
            "create_multipart_upload",
            0,
            self._client.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            ContentType=CONTENT_TYPE,
            Metadata=metadata,
        )
        upload_id: str = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            for number, offset in enumerate(range(0, size, self._chunk), start=1):
                length = min(self._chunk, size - offset)
                etag = await self._run(
                    f"upload_part {number}",
                    length,
                    self._upload_part,
                    key,
                    upload_id,
                    number,
                    path,
                    offset,
                    length,
                )
                parts.append({"PartNumber": number, "ETag": etag})
            await self._run(
                "complete_multipart_upload",
                0,
                self._client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self._abort_soon(key, upload_id)
            raise

    def _upload_part(
        self, key: str, upload_id: str, number: int, path: Path, offset: int, length: int
    ) -> str:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read(length)
        resp = self._client.upload_part(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=chunk,
            ContentMD5=content_md5(hashlib.md5(chunk, usedforsecurity=False).digest()),
        )
        etag: str = resp["ETag"]
        return etag

    def _abort_soon(self, key: str, upload_id: str) -> None:
        """Abort the upload in the executor without waiting for it: the store may be what
        failed, and the event must not wait for it a second time (nor a cancellation)."""
        try:
            self._executor.submit(self._abort, key, upload_id)
        except RuntimeError:  # the executor is shut down: the worker is stopping
            log.warning("could not abort multipart upload of %s: shutting down", key)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not abort multipart upload of %s: %s", key, exc)

    async def head(self, key: str) -> StoredObject | None:
        """The object's size, ETag and metadata, or ``None`` when it does not exist."""
        return await self._run("head_object", 0, self._head, key)

    def _head(self, key: str) -> StoredObject | None:
        return head_object(self._client, self.bucket, key)

    async def list_objects(self, *, page_size: int = 1000) -> AsyncIterator[ListedObject]:
        """Every object of the bucket in key order (S3 lists in UTF-8 byte order), one
        ``list_objects_v2`` page at a time, each call with its own deadline.

        Pages are chained with ``StartAfter`` = the last key seen rather than the
        continuation token: S3Proxy 2.6.0 sends that token URL-encoded (boto3 asks for
        ``encoding-type=url``) and takes it back literally, so a page ending on a key such
        as ``~.mp3`` restarted the listing for ever. A listing that does not move forward
        is an error, never a loop."""
        after: str | None = None
        while True:
            page: dict[str, Any] = await self._run(
                "list_objects_v2",
                0,
                self._client.list_objects_v2,
                Bucket=self.bucket,
                MaxKeys=page_size,
                **({} if after is None else {"StartAfter": after}),
            )
            contents = page.get("Contents", [])
            for item in contents:
                key = str(item["Key"])
                if after is not None and key.encode() <= after.encode():
                    raise DependencyUnavailable(
                        "s3", f"the listing of {self.bucket} went back to {key!r} after {after!r}"
                    )
                after = key
                yield ListedObject(
                    key=key,
                    size=int(item["Size"]),
                    etag=etag_value(item.get("ETag")),
                    last_modified=item["LastModified"],
                )
            if not page.get("IsTruncated") or not contents:
                return

    async def move(self, key: str, target: str) -> None:
        """Copy ``key`` to ``target`` (metadata kept), check the copy, delete ``key``."""
        await self._run(
            "copy_object",
            0,
            self._client.copy_object,
            Bucket=self.bucket,
            Key=target,
            CopySource={"Bucket": self.bucket, "Key": key},
            MetadataDirective="COPY",
        )
        if await self.head(target) is None:
            raise DependencyUnavailable("s3", f"the copy {target} is not there; kept {key}")
        await self._run("delete_object", 0, self._client.delete_object, Bucket=self.bucket, Key=key)


def _client_timeout_s(client: Any) -> float:
    """``connect_timeout + read_timeout`` of a boto3 client's config (botocore's
    defaults when it has none)."""
    config = getattr(getattr(client, "meta", None), "config", None)
    total = 0.0
    for name in ("connect_timeout", "read_timeout"):
        value = getattr(config, name, None)
        total += float(value) if isinstance(value, int | float) else _BOTOCORE_DEFAULT_TIMEOUT_S
    return total


def head_object(client: Any, bucket: str, key: str) -> StoredObject | None:
    """HEAD an object (blocking): its size and metadata, or ``None`` when it is missing."""
    try:
        resp = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return StoredObject(
        key=key,
        size=int(resp["ContentLength"]),
        metadata=resp["Metadata"],
        etag=etag_value(resp.get("ETag")),
    )
