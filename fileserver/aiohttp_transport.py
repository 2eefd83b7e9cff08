"""An httpx transport on aiohttp (opt-in: ``FILESERVER_HTTP_TRANSPORT=aiohttp``).

The :class:`~fileserver.fetch.Fetcher` keeps using an :class:`httpx.AsyncClient`
(policy checks, DNS pinning, ``Host`` header, redirects one hop at a time, size caps);
only the bytes on the wire go through aiohttp, whose client costs a fraction of
httpcore's CPU per request. Semantics kept: the request goes to the URL's host (a
checked IP), the ``Host`` header is the one httpx built, TLS SNI and certificate
verification use the ``sni_hostname`` extension, no redirects, no cookies, no
decompression, no proxy from the environment. aiohttp errors become the httpx
exceptions the fetcher already translates.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

CHUNK = 64 * 1024


class _Body(httpx.AsyncByteStream):
    """The response body, streamed from aiohttp; releases the connection when closed."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc), request=self._request) from exc
        except aiohttp.ClientPayloadError as exc:
            raise httpx.RemoteProtocolError(
                f"peer closed connection without sending complete message body ({exc})",
                request=self._request,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(str(exc), request=self._request) from exc

    async def aclose(self) -> None:
        self._response.release()  # a body not read to the end closes the connection


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled :class:`aiohttp.ClientSession` behind the httpx client interface."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._limit = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit, ssl=self._verify, use_dns_cache=False, ttl_dns_cache=None
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),  # sources cannot plant cookies
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        sni = request.extensions.get("sni_hostname")
        kwargs: dict[str, Any] = {}
        if sni:
            kwargs["server_hostname"] = sni.decode() if isinstance(sni, bytes) else sni
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                allow_redirects=False,
                **kwargs,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientResponseError as exc:
            # aiohttp's parser refuses what h11 refuses, and also Transfer-Encoding next
            # to Content-Length (httpx reads those as chunked): retryable either way.
            why = "bad Content-Length: " if "Content-Length" in exc.message else ""
            raise httpx.RemoteProtocolError(why + exc.message, request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        return httpx.Response(
            response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            await asyncio.sleep(0)
