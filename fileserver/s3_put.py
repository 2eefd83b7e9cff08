"""Single-request S3 PUTs on the event loop (``FILESERVER_S3_TRANSPORT=aiohttp|http11``).

boto3 spends ~1.2-1.6 ms of CPU per ``put_object``, most of it holding the GIL, which
caps one worker process at ~600 puts/s; botocore's signer alone is ~0.2 ms. This module
keeps botocore for credentials (with their refresh) and for resolving the bucket's URL
once (endpoint, path or virtual-host addressing), signs each PUT with AWS Signature
Version 4 itself (:class:`SigV4Signer`, checked against botocore's signer in the unit
tests) and hands it to a sender: :class:`AiohttpSender` (aiohttp) or
:class:`Http11Sender` (fileserver's own HTTP/1.1 client, :mod:`fileserver.http11`, about
half the client CPU per PUT). Only single PUTs of small objects go this way; multipart
uploads, HEAD and the bucket check stay on boto3 (:class:`fileserver.storage.ObjectStore`).

The request carries the same integrity check as the boto3 path: ``Content-MD5``, which
the store verifies (``BadDigest`` on a mismatch). Each sender translates its client's
errors into :class:`~fileserver.errors.DependencyUnavailable`, like
:func:`fileserver.storage.s3_errors`; :class:`S3Putter` turns error responses into the
same.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from fileserver import http11
from fileserver.errors import DependencyUnavailable
from fileserver.storage import content_md5, s3_unavailable

_PROBE_KEY = "fileserver-probe-key"
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")
_ALGORITHM = "AWS4-HMAC-SHA256"


class SigV4Signer:
    """AWS Signature Version 4 for S3 requests without a query string (no I/O).

    Signs every header it is given plus ``host``, ``x-amz-date`` and
    ``x-amz-content-sha256`` (the body's SHA-256: the payload is always signed). The
    signing key is derived once per day, secret and region.
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}

    def _key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): key}  # keep only the current one
        return key

    def sign(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        access_key: str,
        secret_key: str,
        token: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """``headers`` plus the signature headers; ``url``'s path must be already quoted."""
        parts = urlsplit(url)
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        payload_hash = hashlib.sha256(body).hexdigest()
        out = dict(headers)
        out["x-amz-date"] = stamp
        out["x-amz-content-sha256"] = payload_hash
        if token:
            out["x-amz-security-token"] = token
        canonical = {k.lower(): " ".join(v.split()) for k, v in out.items()}
        canonical["host"] = parts.netloc
        names = sorted(canonical)
        signed_headers = ";".join(names)
        request = "\n".join(
            [
                method,
                parts.path or "/",
                "",
                "".join(f"{n}:{canonical[n]}\n" for n in names),
                signed_headers,
                payload_hash,
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._key(secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        out["Authorization"] = (
            f"{_ALGORITHM} Credential={access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        )
        return out


def object_url_prefix(client: Any, bucket: str) -> str:
    """The URL of ``bucket``'s objects up to the key, as botocore resolves it for
    ``client`` (endpoint, path or virtual-host addressing), without sending any request."""
    url: str = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60
    )
    scheme, netloc, path, _query, _fragment = urlsplit(url)
    if not path.endswith("/" + _PROBE_KEY):
        raise ValueError(f"unexpected object URL shape from botocore: {scheme}://{netloc}{path}")
    return urlunsplit((scheme, netloc, path[: -len(_PROBE_KEY)], "", ""))


class Sender(Protocol):
    """Sends one PUT; raises :class:`DependencyUnavailable` when no response comes."""

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """The response's status and body."""
        ...

    async def aclose(self) -> None:
        """Close the connections."""
        ...


class AiohttpSender:
    """PUTs on an :class:`aiohttp.ClientSession` (closed with the sender)."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """The response's status and body."""
        try:
            async with self._session.put(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the session."""
        await self._session.close()


class Http11Sender:
    """PUTs on a :class:`fileserver.http11.Pool` to the bucket's origin."""

    def __init__(self, pool: http11.Pool, *, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """The response's status and body."""
        origin = self._pool.origin
        if not url.startswith(origin + "/"):
            raise ValueError(f"{url!r} is not on this sender's origin {origin}")
        try:
            response = await self._pool.request(
                "PUT", url[len(origin) :], headers, body, timeout_s=self._timeout_s
            )
        except http11.HTTPError as exc:
            raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None
        return response.status, response.body

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self._pool.aclose()


class S3Putter:
    """PUTs small objects into one bucket with SigV4-signed requests through a sender."""

    def __init__(
        self,
        sender: Sender,
        *,
        prefix: str,
        bucket: str,
        credentials: Any,
        region: str,
    ) -> None:
        """``prefix`` from :func:`object_url_prefix`; ``credentials`` a botocore
        credentials object (refreshable ones are refreshed by botocore as needed)."""
        self.sender = sender
        self._prefix = prefix
        self._bucket = bucket
        self._credentials = credentials
        self._signer = SigV4Signer(region)

    @classmethod
    def for_client(cls, sender: Sender, client: Any, bucket: str, *, credentials: Any) -> S3Putter:
        """A putter with ``client``'s endpoint and region (a boto3 S3 client) and the
        credentials of the boto3 session that built it."""
        return cls(
            sender,
            prefix=object_url_prefix(client, bucket),
            bucket=bucket,
            credentials=credentials,
            region=client.meta.region_name or "us-east-1",
        )

    def signed_headers(
        self, url: str, body: bytes, md5_hex: str, content_type: str, metadata: dict[str, str]
    ) -> dict[str, str]:
        """The request headers, SigV4 signature included (no I/O)."""
        headers = {
            "Content-MD5": content_md5(bytes.fromhex(md5_hex)),
            "Content-Type": content_type,
        }
        for name, value in metadata.items():
            headers[f"x-amz-meta-{name}"] = value
        if self._credentials is None:
            raise DependencyUnavailable(
                "s3", "no S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)"
            )
        creds = self._credentials.get_frozen_credentials()
        return self._signer.sign(
            "PUT",
            url,
            headers,
            body,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            token=creds.token,
        )

    async def put(
        self, key: str, body: bytes, md5_hex: str, content_type: str, metadata: dict[str, str]
    ) -> None:
        """PUT ``body`` under ``key``; raises :class:`DependencyUnavailable` on any failure."""
        url = self._prefix + quote(key, safe="/~")
        headers = self.signed_headers(url, body, md5_hex, content_type, metadata)
        status, reply = await self.sender.put(url, headers, body)
        if status == 200:
            return
        fields = dict(_XML_FIELD.findall(reply[:2000].decode("utf-8", "replace")))
        raise s3_unavailable(
            fields.get("Code", f"HTTP {status}"), fields.get("Message", ""), self._bucket
        )
