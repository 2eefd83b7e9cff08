"""A recording's audio: a short-lived presigned S3 URL, or a streamed proxy.

The proxy fetches the same presigned URL with the serve process's aiohttp session and
streams the body through in chunks (nothing is held in memory but a chunk), passing a
single ``Range: bytes=…`` request on to S3, so S3 itself answers 206 / 416 with the
right ``Content-Range``: seeking in an audio element works without a byte of the
object being read here first. Other range forms (several ranges) are ignored and the
whole object is sent (RFC 9110 allows a server to ignore Range).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import aiohttp
from aiohttp import web

from fileserver.db.reads import RecordingView
from fileserver.errors import DependencyUnavailable
from fileserver.storage import CONTENT_TYPE

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024
SINGLE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-\d+)")
#: a last byte past anything stored means "to the end" (RFC 9110 §14.1.2); S3 servers
#: may fail to parse such a number (SeaweedFS answered 416), so it is sent open-ended
LARGEST_OBJECT = 2**53


def upstream_range(wanted: str) -> str | None:
    """The one Range to ask S3 for, or None to send the whole object: multi-range and
    invalid specs (``bytes=5-2``) are ignored, as RFC 9110 allows; an oversized last
    byte becomes open-ended."""
    match = SINGLE_RANGE.fullmatch(wanted)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first is None or not last:  # suffix (bytes=-N) or open-ended (bytes=N-)
        return wanted
    if len(last) > 16 or int(last) >= LARGEST_OBJECT:
        return f"bytes={first}-"
    if int(last) < int(first):
        return None
    return wanted


PASSED_HEADERS = ("Content-Length", "Content-Range", "ETag", "Last-Modified")


class ObjectMissing(Exception):
    """The row's object is not in the bucket (``fileserver reconcile`` reports it)."""


class Presigner:
    """Presigned GET URLs of the rows' objects (``generate_presigned_url`` signs locally;
    it runs in a thread since resolving credentials may do I/O the first time)."""

    def __init__(self, s3_client: Any, ttl_s: int) -> None:
        self._client = s3_client
        self.ttl_s = ttl_s

    async def url(self, row: RecordingView) -> str:
        url: str = await asyncio.to_thread(
            self._client.generate_presigned_url,
            "get_object",
            Params={
                "Bucket": row.s3_bucket,
                "Key": row.s3_key,
                "ResponseContentType": CONTENT_TYPE,
            },
            ExpiresIn=self.ttl_s,
        )
        return url


async def proxy(
    request: web.Request, http: aiohttp.ClientSession, url: str, counter: Any = None
) -> web.StreamResponse:
    """Stream the object at presigned ``url`` to the client, honouring one byte range."""
    headers: dict[str, str] = {}
    wanted = (request.headers.get("Range") or "").strip()
    ranged = upstream_range(wanted)
    if ranged is not None:
        headers["Range"] = ranged
    try:  # a HEAD is a GET upstream too (the URL is signed for GET), its body unread
        async with http.request("GET", url, headers=headers, allow_redirects=False) as up:
            if up.status == 404:
                raise ObjectMissing()
            if up.status == 416:
                refused = web.Response(status=416)
                if "Content-Range" in up.headers:
                    refused.headers["Content-Range"] = up.headers["Content-Range"]
                return refused
            if up.status not in (200, 206):
                raise DependencyUnavailable("s3", f"GET of the object answered {up.status}")
            resp = web.StreamResponse(status=up.status)
            for name in PASSED_HEADERS:
                if name in up.headers:
                    resp.headers[name] = up.headers[name]
            resp.headers["Content-Type"] = CONTENT_TYPE
            resp.headers["Accept-Ranges"] = "bytes"
            resp.headers["Cache-Control"] = "private, max-age=300"
            await resp.prepare(request)
            try:
                if request.method != "HEAD":
                    async for chunk in up.content.iter_chunked(CHUNK_BYTES):
                        await resp.write(chunk)
                        if counter is not None:
                            counter.inc(len(chunk))
                await resp.write_eof()
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                # the headers are sent: the only way left to say "incomplete" is to close
                log.info("audio stream ended early: %s", type(exc).__name__)
                if request.transport is not None:
                    request.transport.close()
            return resp
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}"[:300]) from None
