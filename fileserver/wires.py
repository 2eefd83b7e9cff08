"""The wire under the fetcher: one GET to one checked address, on httpx or on aiohttp.

:class:`~fileserver.fetch.Fetcher` does everything that decides *whether* and *where* to
connect (policy, one DNS lookup per hop, pinned address, redirects one hop at a time, size
caps, timeouts). A wire only sends the GET it is given, to the URL's host (a checked IP),
with the given ``Host`` header and TLS SNI / verification name, and streams the body:
no redirects, no cookies, no decompression, no proxy from the environment.

* :class:`AiohttpWire` (the default, ``FILESERVER_HTTP_TRANSPORT=aiohttp``): an
  :class:`aiohttp.ClientSession`, used directly: ~0.1 ms of CPU per GET against
  ~1.5-2.5 ms for httpx on this machine (``bench/``; research notes).
* :class:`HttpxWire` (``FILESERVER_HTTP_TRANSPORT=httpx``): an
  :class:`httpx.AsyncClient`, the API the downloads were first written against.

Errors, drawn once::

    WireError            a transport failure, described without the URL (the fetcher adds it)
     ├─ connect=True      the connection was not made: the next checked address may be tried
     └─ timeout=True      connect or read timed out

``kind`` names the failure the same way on both wires (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``), so the
fetcher's messages do not depend on the wire.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
import httpx

CHUNK = 64 * 1024
REQUEST_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "fileserver"}


class WireError(Exception):
    """A transport failure on one request."""

    def __init__(
        self, kind: str, message: str, *, connect: bool = False, timeout: bool = False
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.connect = connect
        self.timeout = timeout


class WireResponse(Protocol):
    """What the fetcher reads of a response."""

    @property
    def status(self) -> int: ...

    def header(self, name: str) -> str | None:
        """A header's value (case-insensitive), or ``None``."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The raw body (no decoding); raises :class:`WireError`."""
        ...

    async def aclose(self) -> None:
        """Release the connection (closing it when the body was not read to the end)."""
        ...


class Wire(Protocol):
    """Sends one GET; raises :class:`WireError`."""

    async def get(self, url: str, *, host_header: str, sni_hostname: str | None) -> WireResponse:
        """GET ``url`` (its host is the checked address) with ``Host: host_header``."""
        ...

    async def aclose(self) -> None:
        """Close the connection pool."""
        ...


# --------------------------------------------------------------------------- httpx


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw(CHUNK):
                yield chunk
        except httpx.TimeoutException as exc:
            raise WireError(type(exc).__name__, str(exc), timeout=True) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise WireError(type(exc).__name__, str(exc)) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxWire:
    """The wire on an :class:`httpx.AsyncClient` (event hooks, limits and TLS are its own)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, url: str, *, host_header: str, sni_hostname: str | None) -> WireResponse:
        extensions = {"sni_hostname": sni_hostname} if sni_hostname else {}
        request = self.client.build_request(
            "GET", url, headers={"Host": host_header}, extensions=extensions
        )
        try:
            response = await self.client.send(request, stream=True, follow_redirects=False)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            timeout = isinstance(exc, httpx.ConnectTimeout)
            raise WireError(type(exc).__name__, str(exc), connect=True, timeout=timeout) from None
        except httpx.TimeoutException as exc:
            raise WireError(type(exc).__name__, str(exc), timeout=True) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise WireError(type(exc).__name__, str(exc)) from None
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------- aiohttp


class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise WireError("ReadTimeout", str(exc), timeout=True) from None
        except aiohttp.ClientPayloadError as exc:
            raise WireError(
                "RemoteProtocolError",
                f"peer closed connection without sending complete message body ({exc})",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WireError("ReadError", str(exc)) from None

    async def aclose(self) -> None:
        self._response.release()  # a body not read to the end closes the connection


class AiohttpWire:
    """The wire on one pooled :class:`aiohttp.ClientSession` (opened on first use)."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        verify: ssl.SSLContext | bool = True,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        """``verify``: ``True`` (system CAs), ``False``, or an SSL context.
        ``trace_configs``: aiohttp request hooks (the tests record what is sent)."""
        self._limit = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._verify = verify
        self._traces = trace_configs
        self.session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit, ssl=self._verify, use_dns_cache=False, ttl_dns_cache=None
            )
            self.session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),  # sources cannot plant cookies
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                trace_configs=self._traces,
            )
        return self.session

    async def get(self, url: str, *, host_header: str, sni_hostname: str | None) -> WireResponse:
        session = self._open()
        try:
            response = await session.get(
                url,
                headers={"Host": host_header, **REQUEST_HEADERS},
                allow_redirects=False,
                server_hostname=sni_hostname,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise WireError("ConnectTimeout", str(exc), connect=True, timeout=True) from None
        except aiohttp.ClientConnectorError as exc:
            raise WireError("ConnectError", str(exc), connect=True) from None
        except aiohttp.ClientResponseError as exc:
            # aiohttp's parser refuses what h11 refuses, and also Transfer-Encoding next to
            # Content-Length (httpx reads those as chunked): retryable either way.
            why = "bad Content-Length: " if "Content-Length" in exc.message else ""
            raise WireError("RemoteProtocolError", why + exc.message) from None
        except aiohttp.ServerDisconnectedError as exc:
            raise WireError("RemoteProtocolError", str(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WireError("ConnectError", str(exc), connect=True) from None
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()
            await asyncio.sleep(0)  # let closing TLS transports finish
