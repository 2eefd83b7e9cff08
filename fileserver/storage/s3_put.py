"""Single-request S3 PUTs on the event loop (``FILESERVER_S3_TRANSPORT=http11``, the
default, or ``aiohttp``).

boto3 spends ~1.2-1.6 ms of CPU per ``put_object``, most of it holding the GIL, which
caps one worker process at ~600 puts/s; botocore's signer alone is ~0.2 ms. This module
keeps botocore for credentials (with their refresh) and for resolving the bucket's URL
once (endpoint, path or virtual-host addressing), signs each PUT with AWS Signature
Version 4 itself (:class:`SigV4Signer`, checked against botocore's signer in the unit
tests) and hands it to a sender: :class:`Http11Sender` (fileserver's small HTTP/1.1
client, :mod:`fileserver.storage.http11`, about half the client CPU per PUT) or
:class:`AiohttpSender` (aiohttp). Only single PUTs of small objects go this way (and
the preflight's probe, a PUT and a DELETE of :data:`PREFLIGHT_KEY`); multipart uploads,
HEAD, listing, moves and the bucket check stay on boto3
(:class:`fileserver.storage.ObjectStore`).

Neither sender goes through a proxy. botocore sends through ``HTTPS_PROXY`` /
``HTTP_PROXY`` unless ``NO_PROXY`` exempts the endpoint; :func:`environment_proxy` says
when that would apply, and the runtime then refuses to start on a fast path
(``runtime.make_s3_putter``) rather than bypass a proxy an operator set.

The request carries the same integrity check as the boto3 path: ``Content-MD5``, which
the store verifies (``BadDigest`` on a mismatch). Each sender translates its client's
errors into :class:`~fileserver.errors.DependencyUnavailable`, like
:func:`fileserver.storage.base.s3_errors`; :class:`S3Putter` turns error responses into
the same (:func:`error_response`: the code, message and region of the error's XML).

Three things keep a PUT from stalling the worker: the Host header is computed once
(:func:`fileserver.storage.http11.host_header`, as botocore does) and both signed and
sent, so a ``https://host:443`` endpoint signs what the store receives; credentials are
read on the loop and refreshed in a worker thread (:class:`FrozenCredentials`), since a
refresh of IRSA/STS/instance-role credentials is a blocking HTTP call; and each sender
bounds the whole request (connection, upload, response) by ``timeout_s``, naming the
settings it comes from when it fires.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from botocore.utils import get_environ_proxies

from fileserver.errors import DependencyUnavailable
from fileserver.storage import http11
from fileserver.storage.base import S3ErrorResponse, content_md5

_PROBE_KEY = "fileserver-probe-key"  # only to resolve the URL shape: never sent
#: The object :func:`fileserver.preflight.check_fast_put` PUTs and DELETEs at start; the
#: same key every time, so one is left at most when the credentials may not delete.
PREFLIGHT_KEY = "fileserver-preflight-probe"
PREFLIGHT_BODY = b"fileserver preflight probe: a signed PUT at start, deleted at once\n"
_XML_FIELD = re.compile(r"<(Code|Message|Region)>([^<]*)</\1>")
_ALGORITHM = "AWS4-HMAC-SHA256"
#: The settings behind the senders' deadlines (runtime: ``timeout_s`` = connect + read).
DEADLINE_SETTINGS = "FILESERVER_CONNECT_TIMEOUT_S + FILESERVER_READ_TIMEOUT_S"


class SigV4Signer:
    """AWS Signature Version 4 for S3 requests without a query string (no I/O).

    Signs every header it is given plus ``host``, ``x-amz-date`` and
    ``x-amz-content-sha256`` (the body's SHA-256: the payload is always signed). The
    signing key is derived once per day, secret and region. The signed ``Host`` is the
    one in ``headers`` or else :func:`fileserver.storage.http11.host_header` of the URL,
    and it is always in the headers returned: send exactly those, or the store computes
    another signature (``SignatureDoesNotMatch``).
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
        """``headers`` plus ``Host`` and the signature headers; ``url``'s path must be
        already quoted."""
        parts = urlsplit(url)
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        payload_hash = hashlib.sha256(body).hexdigest()
        out = dict(headers)
        if not any(name.lower() == "host" for name in out):
            out["Host"] = http11.host_header(url)
        out["x-amz-date"] = stamp
        out["x-amz-content-sha256"] = payload_hash
        if token:
            out["x-amz-security-token"] = token
        canonical = {k.lower(): " ".join(v.split()) for k, v in out.items()}
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


def environment_proxy(client: Any, url: str) -> str | None:
    """The proxy botocore sends ``client``'s requests to ``url`` through, from the
    environment (``HTTPS_PROXY`` / ``HTTP_PROXY`` by the URL's scheme, unless
    ``NO_PROXY`` exempts the client's endpoint), or ``None``: botocore's own rule."""
    proxies: dict[str, str] = get_environ_proxies(client.meta.endpoint_url)
    return proxies.get(urlsplit(url).scheme) or None


def error_response(status: int, reply: bytes, bucket: str) -> S3ErrorResponse:
    """The error an S3 error answer means: its XML's ``Code``, ``Message`` and
    ``Region`` (``HTTP <status>`` when it names no code). Any bytes at all."""
    fields = dict(_XML_FIELD.findall(reply[:4000].decode("utf-8", "replace")))
    return S3ErrorResponse(
        fields.get("Code") or f"HTTP {status}",
        fields.get("Message", ""),
        bucket,
        status=status,
        region=fields.get("Region", ""),
    )


class Sender(Protocol):
    """Sends one request; raises :class:`DependencyUnavailable` when no response comes
    within ``timeout_s`` (the whole request, not each read)."""

    timeout_s: float

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """The response's status and body; ``headers`` carry the signed ``Host``."""
        ...

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``request("PUT", ...)``."""
        ...

    async def aclose(self) -> None:
        """Close the connections."""
        ...


def _deadline_error(exc: BaseException, seconds: float, setting: str) -> DependencyUnavailable:
    """A timeout worded with the setting to raise, so an operator knows what bounded it."""
    return DependencyUnavailable(
        "s3", f"{type(exc).__name__}: no answer within {seconds:g} s ({setting})"
    )


class AiohttpSender:
    """PUTs on an :class:`aiohttp.ClientSession` (closed with the sender).

    The session's own ``sock_connect`` / ``sock_read`` timeouts are kept and ``total``
    is set to ``timeout_s``: a per-request timeout replaces the session's whole, and
    ``sock_read`` alone never fires on a server that trickles a byte at a time.
    """

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float) -> None:
        self._session = session
        self.timeout_s = timeout_s
        base = session.timeout
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s,
            connect=base.connect,
            sock_read=base.sock_read,
            sock_connect=base.sock_connect,
            ceil_threshold=base.ceil_threshold,
        )

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``request("PUT", ...)``."""
        return await self.request("PUT", url, headers, body)

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """The response's status and body (aiohttp sends the ``Host`` given, as is)."""
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                return resp.status, await resp.read()
        except aiohttp.ConnectionTimeoutError as exc:
            t = self._timeout.sock_connect or self.timeout_s
            raise _deadline_error(exc, t, "FILESERVER_CONNECT_TIMEOUT_S") from None
        except aiohttp.SocketTimeoutError as exc:
            t = self._timeout.sock_read or self.timeout_s
            raise _deadline_error(exc, t, "FILESERVER_READ_TIMEOUT_S") from None
        except TimeoutError as exc:  # total: connection, upload and response together
            raise _deadline_error(exc, self.timeout_s, DEADLINE_SETTINGS) from None
        except aiohttp.ClientError as exc:
            raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the session."""
        await self._session.close()


class Http11Sender:
    """PUTs on a :class:`fileserver.storage.http11.Pool` to the bucket's origin."""

    def __init__(self, pool: http11.Pool, *, timeout_s: float) -> None:
        self._pool = pool
        self.timeout_s = timeout_s

    async def put(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``request("PUT", ...)``."""
        return await self.request("PUT", url, headers, body)

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """The response's status and body.

        The pool writes its own ``Host``; a signed ``Host`` in ``headers`` must be that
        very value (``ValueError`` otherwise: the signature would not match).
        """
        origin = self._pool.origin
        if not url.startswith(origin + "/"):
            raise ValueError(f"{url!r} is not on this sender's origin {origin}")
        rest: dict[str, str] = {}
        for name, value in headers.items():
            if name.lower() != "host":
                rest[name] = value
            elif value != self._pool.host_header:
                raise ValueError(
                    f"signed Host {value!r} but the pool sends {self._pool.host_header!r}"
                )
        try:
            response = await self._pool.request(
                method, url[len(origin) :], rest, body, timeout_s=self.timeout_s
            )
        except http11.ConnectTimeout as exc:
            raise DependencyUnavailable(
                "s3", f"ConnectTimeout: {exc} (FILESERVER_CONNECT_TIMEOUT_S)"
            ) from None
        except http11.RequestTimeout as exc:
            raise _deadline_error(exc, self.timeout_s, DEADLINE_SETTINGS) from None
        except http11.HTTPError as exc:
            raise DependencyUnavailable("s3", f"{type(exc).__name__}: {exc}") from None
        return response.status, response.body

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self._pool.aclose()


class FrozenCredentials:
    """botocore credentials for signing on the event loop, refreshed off it.

    ``get_frozen_credentials()`` of refreshable credentials (IRSA, STS, instance roles,
    SSO) refreshes them in place when they are close to expiring: a blocking HTTP call
    that, on the loop, would stall every download and PUT of the worker. Here the loop
    only reads them while botocore says no refresh is due (``refresh_needed()``, with a
    few seconds of margin so that botocore's own check cannot start one on the loop);
    otherwise one worker thread refreshes them and every PUT waiting meanwhile shares
    that refresh. Static credentials never need one.
    """

    def __init__(self, credentials: Any, *, margin_s: float = 5.0) -> None:
        self._credentials = credentials
        refresh_needed = getattr(credentials, "refresh_needed", None)
        self._refresh_needed = refresh_needed if callable(refresh_needed) else None
        # botocore refreshes inside get_frozen_credentials() once this many seconds or
        # fewer are left (its "advisory" window; the mandatory one is shorter).
        advisory = getattr(credentials, "_advisory_refresh_timeout", 15 * 60)
        self._refresh_in = float(advisory) + margin_s
        self._refreshing: asyncio.Future[Any] | None = None

    def refresh_due(self) -> bool:
        """Whether reading the credentials now could refresh them (I/O)."""
        if self._refresh_needed is None:
            return False
        return bool(self._refresh_needed(self._refresh_in))

    def cached(self) -> Any:
        """Frozen credentials read without I/O, or ``None`` when a refresh is due."""
        if self.refresh_due():
            return None
        return self._credentials.get_frozen_credentials()

    async def get(self) -> Any:
        """Frozen credentials (access key, secret key, token), valid for one signature."""
        frozen = self.cached()
        if frozen is not None:
            return frozen
        if self._refreshing is None:
            future = asyncio.ensure_future(
                asyncio.to_thread(self._credentials.get_frozen_credentials)
            )
            future.add_done_callback(self._refreshed)
            self._refreshing = future
        # shielded: a cancelled PUT does not cancel the refresh the others wait for
        return await asyncio.shield(self._refreshing)

    def _refreshed(self, future: asyncio.Future[Any]) -> None:
        if self._refreshing is future:
            self._refreshing = None
        if not future.cancelled():
            future.exception()  # retrieved: the waiters (if any are left) re-raise it


class S3Putter:
    """PUTs small objects into one bucket with SigV4-signed requests through a sender
    (and DELETEs the preflight's probe)."""

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
        credentials object (refreshable ones are refreshed in a worker thread, see
        :class:`FrozenCredentials`)."""
        self.sender = sender
        self._prefix = prefix
        self._host = http11.host_header(prefix)  # signed and sent: one value
        self._bucket = bucket
        self._credentials = None if credentials is None else FrozenCredentials(credentials)
        self._signer = SigV4Signer(region)

    @property
    def region(self) -> str:
        """The region the requests are signed for."""
        return self._signer.region

    @property
    def prefix(self) -> str:
        """The URL of the bucket's objects up to the key."""
        return self._prefix

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
        self,
        url: str,
        body: bytes,
        md5_hex: str,
        content_type: str,
        metadata: dict[str, str],
        *,
        credentials: Any,
    ) -> dict[str, str]:
        """The request headers, ``Host`` and SigV4 signature included (no I/O);
        ``credentials`` are frozen ones (:meth:`FrozenCredentials.get`)."""
        headers = {
            "Host": self._host,
            "Content-MD5": content_md5(bytes.fromhex(md5_hex)),
            "Content-Type": content_type,
        }
        for name, value in metadata.items():
            headers[f"x-amz-meta-{name}"] = value
        return self._signer.sign(
            "PUT",
            url,
            headers,
            body,
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            token=credentials.token,
        )

    async def _frozen_credentials(self) -> Any:
        """The credentials to sign with, waiting for a refresh at most the sender's
        ``timeout_s`` (the refresh goes on in its thread for the next PUTs)."""
        if self._credentials is None:
            raise DependencyUnavailable(
                "s3", "no S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)"
            )
        frozen = self._credentials.cached()
        if frozen is not None:  # the common case: no timer, no task
            return frozen
        timeout_s = self.sender.timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await self._credentials.get()
        except Exception as exc:  # whatever the refresh raised (STS, IMDS, files)
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise _deadline_error(exc, timeout_s, DEADLINE_SETTINGS) from None
            raise DependencyUnavailable(
                "s3", f"cannot refresh the S3 credentials: {type(exc).__name__}: {exc}"
            ) from None

    async def put(
        self, key: str, body: bytes, md5_hex: str, content_type: str, metadata: dict[str, str]
    ) -> None:
        """PUT ``body`` under ``key``; raises :class:`DependencyUnavailable` on any failure."""
        credentials = await self._frozen_credentials()
        url = self._prefix + quote(key, safe="/~")
        headers = self.signed_headers(
            url, body, md5_hex, content_type, metadata, credentials=credentials
        )
        status, reply = await self.sender.request("PUT", url, headers, body)
        if status != 200:
            raise error_response(status, reply, self._bucket)

    async def delete(self, key: str) -> None:
        """DELETE ``key`` (missing or not: S3 answers 204 either way)."""
        credentials = await self._frozen_credentials()
        url = self._prefix + quote(key, safe="/~")
        headers = self._signer.sign(
            "DELETE",
            url,
            {"Host": self._host},
            b"",
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            token=credentials.token,
        )
        status, reply = await self.sender.request("DELETE", url, headers, b"")
        if status not in (200, 202, 204):
            raise error_response(status, reply, self._bucket)
