"""Downloading a recording: streamed into a temporary file while hashing.

Never holds the file in memory, enforces the size cap on ``Content-Length`` and on
the bytes actually read, follows at most :data:`MAX_REDIRECTS` redirects (each one
re-checked by the :class:`~fileserver.sources.SourcePolicy`), and always removes the
temporary file. httpx errors are translated here into the fileserver error tree.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from time import time
from typing import BinaryIO
from urllib.parse import urljoin

import httpx

from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.sources import SourcePolicy

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
_RETRYABLE_STATUS = {408, 425, 429}


@dataclass(frozen=True)
class Download:
    """A fetched recording on local disk."""

    path: Path
    size: int
    md5: str
    url: str


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


class Fetcher:
    """Fetches recordings with one shared :class:`httpx.AsyncClient`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        policy: SourcePolicy,
        *,
        max_bytes: int,
        total_timeout_s: float,
        tmp_dir: str | None = None,
    ) -> None:
        self._client = client
        self._policy = policy
        self._max_bytes = max_bytes
        self._total_timeout_s = total_timeout_s
        self._tmp_dir = tmp_dir

    @asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Download]:
        """Download ``url`` to a temporary file that is removed when the block exits."""
        fd, name = tempfile.mkstemp(prefix="fileserver-", suffix=".mp3", dir=self._tmp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    async with asyncio.timeout(self._total_timeout_s):
                        size, md5, final_url = await self._fetch(url, sink)
                except TimeoutError:
                    raise SourceUnavailable(
                        f"download took longer than FILESERVER_FETCH_TIMEOUT_S="
                        f"{self._total_timeout_s:g}s: {url[:200]}"
                    ) from None
            yield Download(path=path, size=size, md5=md5, url=final_url)
        finally:
            with suppress(FileNotFoundError):
                path.unlink()

    async def _fetch(self, url: str, sink: BinaryIO) -> tuple[int, str, str]:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            self._policy.check(current)
            try:
                async with self._client.stream("GET", current, follow_redirects=False) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise SourceUnavailable(f"HTTP {resp.status_code} without Location")
                        current = urljoin(current, location)
                        continue
                    self._check_status(resp, current)
                    return await self._stream_body(resp, sink, current)
            except httpx.TimeoutException as exc:
                raise SourceUnavailable(
                    f"timeout ({type(exc).__name__}) from {current[:200]}"
                ) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise SourceUnavailable(f"{type(exc).__name__}: {exc} ({current[:200]})") from None
        raise PermanentError(
            Reason.SOURCE_FORBIDDEN, f"more than {MAX_REDIRECTS} redirects from {url[:200]}"
        )

    def _check_status(self, resp: httpx.Response, url: str) -> None:
        status = resp.status_code
        if status == 200:
            return
        if status in (404, 410):
            raise PermanentError(Reason.SOURCE_NOT_FOUND, f"HTTP {status} from {url[:200]}")
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise SourceUnavailable(
                f"HTTP {status} from {url[:200]}",
                retry_after=_retry_after(resp.headers.get("retry-after")),
            )
        raise PermanentError(Reason.SOURCE_UNAVAILABLE, f"HTTP {status} from {url[:200]}")

    async def _stream_body(
        self, resp: httpx.Response, sink: BinaryIO, url: str
    ) -> tuple[int, str, str]:
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_bytes:
            raise PermanentError(
                Reason.TOO_LARGE,
                f"Content-Length {length} exceeds FILESERVER_MAX_FILE_BYTES={self._max_bytes}",
            )
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        write = sink.write
        async for chunk in resp.aiter_raw(CHUNK):
            size += len(chunk)
            if size > self._max_bytes:
                raise PermanentError(
                    Reason.TOO_LARGE,
                    f"body exceeds FILESERVER_MAX_FILE_BYTES={self._max_bytes} bytes",
                )
            digest.update(chunk)
            write(chunk)
        if length is not None and length.isdigit() and int(length) != size:
            raise SourceUnavailable(f"body ended after {size} of {length} bytes: {url[:200]}")
        return size, digest.hexdigest(), url
