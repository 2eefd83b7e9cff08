"""The wire under the fetcher: one GET to one checked address, on aiohttp, http11 or httpx.

:class:`~fileserver.fetch.Fetcher` does everything that decides *whether* and *where* to
connect (policy, one DNS lookup per hop, pinned address, redirects one hop at a time, size
caps, timeouts). A wire only sends the GET it is given, to the URL's host (a checked IP),
with the given ``Host`` header and TLS SNI / verification name, and streams the body:
no redirects, no cookies, no decompression, no proxy from the environment.

* :class:`Http11Wire` (the default, ``FILESERVER_HTTP_TRANSPORT=http11``): fileserver's
  HTTP/1.1 client (:mod:`fileserver.storage.http11`, the one the S3 PUTs use; llhttp
  through httptools), the body streamed with flow control. Client CPU per download of a
  9 KB clip through the Fetcher, concurrency 32 (``python -m bench.components --n 3000``,
  medians of 3 runs on a shared 2-core machine, both wires in each run): 149 µs against
  235 µs on aiohttp (ratio 0.61-0.64 within each run); it does not build a request
  object, look up auto headers or reschedule a read timer per chunk, and its pools are
  keyed by ``Host`` and SNI too (a connection verified for one name never carries
  another's request).
* :class:`AiohttpWire` (``FILESERVER_HTTP_TRANSPORT=aiohttp``, the default before
  http11): an :class:`aiohttp.ClientSession`, used directly: ~0.1 ms of CPU per GET
  against ~1.5-2.5 ms for httpx on this machine (``bench/``; research notes).
* :class:`HttpxWire` (``FILESERVER_HTTP_TRANSPORT=httpx``): an
  :class:`httpx.AsyncClient`, the API the downloads were first written against.

Errors, drawn once::

    WireError            a transport failure, described without the URL (the fetcher adds it)
     ├─ connect=True      the connection was not made: the next checked address may be tried
     └─ timeout=True      connect or read timed out

``kind`` names the failure the same way on every wire (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``), so the
fetcher's messages do not depend on the wire.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import quote

import aiohttp
import httpx

from fileserver.storage import http11

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
        except aiohttp.SocketTimeoutError as exc:  # connected; silent before the head
            raise WireError("ReadTimeout", str(exc), timeout=True) from None
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


# --------------------------------------------------------------------------- http11

KEEPALIVE_S = 15.0  # an idle connection older than this is closed (aiohttp's default)
_TARGET_SAFE = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_HOST_SAFE = re.compile(r"[A-Za-z0-9\-._:\[\]]+")  # "_": names the policy allows (DNS does)
_TAIL = "".join(f"{k}: {v}\r\n" for k, v in REQUEST_HEADERS.items()) + "\r\n"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_Key = tuple[str, str, int, str, str | None]


def _split(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, target)`` of a URL the fetcher built from checked parts
    (``scheme://host[:port]/target``; an IPv6 host in brackets, returned without)."""
    scheme, sep, rest = url.partition("://")
    slash = rest.find("/")
    if not sep or scheme not in _DEFAULT_PORTS or slash <= 0:
        raise ValueError(f"not an absolute http(s) URL with a path: {url[:200]!r}")
    authority, target = rest[:slash], rest[slash:]
    if authority.startswith("["):
        host, _, after = authority[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else after
    else:
        host, _, port_text = authority.partition(":")
    if not port_text:
        return scheme, host, _DEFAULT_PORTS[scheme], target
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"invalid port in {url[:200]!r}")
    return scheme, host, int(port_text), target


def _request(target: str, host_header: str) -> bytes:
    """The GET's bytes: the target percent-encoded as aiohttp and httpx send it (a space,
    a non-ASCII character ...), the headers of :data:`REQUEST_HEADERS`."""
    if not _TARGET_SAFE.fullmatch(target):
        target = quote(target, safe="/!$&'()*+,;=:@?%~")
    if not _HOST_SAFE.fullmatch(host_header):
        raise ValueError(f"invalid Host header {host_header[:80]!r}")
    return f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n{_TAIL}".encode("ascii")


def _protocol_error(exc: http11.ProtocolError, *, in_body: bool) -> WireError:
    if isinstance(exc, http11.ServerDisconnected):
        if in_body:
            return WireError(
                "RemoteProtocolError",
                f"peer closed connection without sending complete message body ({exc})",
            )
        return WireError("RemoteProtocolError", f"server disconnected: {exc}")
    why = "bad Content-Length: " if "Content-Length" in str(exc) else ""
    return WireError("RemoteProtocolError", why + str(exc))


class _Http11Response:
    __slots__ = ("_conn", "_headers", "_key", "_wire", "status")

    def __init__(
        self, wire: Http11Wire, key: _Key, conn: http11.StreamConnection, head: http11.Head
    ) -> None:
        self._wire = wire
        self._key = key
        self._conn: http11.StreamConnection | None = conn
        self._headers = head.headers
        self.status = head.status

    def header(self, name: str) -> str | None:
        key = name.lower()
        if key == "content-length" and "transfer-encoding" in self._headers:
            return None  # the body is framed by the transfer coding: the length says nothing
        return self._headers.get(key)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None, "the response is closed"
        try:
            while True:
                data = conn.take()
                if data:
                    yield data
                elif conn.complete:
                    return
                else:
                    await conn.readable()
        except http11.ReadTimeout as exc:
            raise WireError("ReadTimeout", str(exc), timeout=True) from None
        except http11.ProtocolError as exc:
            raise _protocol_error(exc, in_body=True) from None
        except http11.HTTPError as exc:  # pragma: no cover - nothing else is raised here
            raise WireError("ReadError", str(exc)) from None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._wire._release(self._key, conn)


class Http11Wire:
    """The wire on :mod:`fileserver.storage.http11` (llhttp through httptools, asyncio
    protocol connections, bodies streamed with flow control).

    Keep-alive pools keyed by (scheme, address, port, ``Host``, SNI); at most
    ``max_connections`` requests in flight (each holds its connection until its
    response is closed), at most as many idle connections, each closed after
    :data:`KEEPALIVE_S` idle. A connection is kept only when its response was read
    from the network exactly to its end and said keep-alive; a reused connection that
    the server had closed (no byte of the response) is replaced once by a new one.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: ``True`` (system CAs), ``False``, or an SSL context."""
        self._limit = max_connections
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[_Key, list[tuple[float, http11.StreamConnection]]] = {}
        self._idle_count = 0
        self._open: set[http11.StreamConnection] = set()
        self._next_sweep = 0.0

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use."""
        return sum(1 for c in self._open if not c.closed)

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self._verify, ssl.SSLContext):
                self._ssl = self._verify
            elif self._verify:
                self._ssl = ssl.create_default_context()
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                self._ssl = context
        return self._ssl

    async def get(self, url: str, *, host_header: str, sni_hostname: str | None) -> WireResponse:
        scheme, host, port, target = _split(url)
        data = _request(target, host_header)
        key: _Key = (scheme, host, port, host_header, sni_hostname)
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._limit)
        await slots.acquire()
        try:
            conn = self._reuse(key)
            try:
                if conn is not None:
                    try:
                        head = await self._exchange(conn, data)
                        return _Http11Response(self, key, conn, head)
                    except http11.ServerDisconnected as exc:
                        if not exc.before_response:
                            raise  # closed by the server while idle: once more, on a new one
                conn = await http11.open_stream(
                    host,
                    port,
                    ssl_context=self._context() if scheme == "https" else None,
                    server_hostname=sni_hostname,
                    connect_timeout_s=self._connect_timeout,
                    read_timeout_s=self._read_timeout,
                )
                self._open.add(conn)
                head = await self._exchange(conn, data)
                return _Http11Response(self, key, conn, head)
            except http11.ConnectTimeout as exc:
                raise WireError("ConnectTimeout", str(exc), connect=True, timeout=True) from None
            except http11.ConnectError as exc:
                raise WireError("ConnectError", str(exc), connect=True) from None
            except http11.ReadTimeout as exc:
                raise WireError("ReadTimeout", str(exc), timeout=True) from None
            except http11.ProtocolError as exc:
                raise _protocol_error(exc, in_body=False) from None
        except BaseException:
            slots.release()
            raise

    async def _exchange(self, conn: http11.StreamConnection, data: bytes) -> http11.Head:
        conn.send(data)
        try:
            return await conn.response_head()
        except BaseException:  # errors, cancellation: the connection is unusable
            conn.close()
            self._open.discard(conn)
            raise

    def _reuse(self, key: _Key) -> http11.StreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - KEEPALIVE_S
        conn = None
        while idle:
            since, candidate = idle.pop()
            self._idle_count -= 1
            transport = candidate.transport
            if (
                since > oldest
                and not candidate.closed
                and transport is not None
                and not transport.is_closing()
            ):
                conn = candidate
                break
            self._drop(candidate)
        if not idle:
            del self._idle[key]
        return conn

    def _release(self, key: _Key, conn: http11.StreamConnection) -> None:
        """The response is closed: keep its connection for the next request, or close it."""
        assert self._slots is not None
        self._slots.release()
        now = asyncio.get_running_loop().time()
        if now >= self._next_sweep:
            self._sweep(now)
        if conn.reusable() and self._idle_count < self._limit:
            conn.reset()
            self._idle.setdefault(key, []).append((now, conn))
            self._idle_count += 1
        else:
            self._drop(conn)

    def _sweep(self, now: float) -> None:
        """Close the connections idle for longer than :data:`KEEPALIVE_S`."""
        self._next_sweep = now + KEEPALIVE_S
        oldest = now - KEEPALIVE_S
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [(since, c) for since, c in idle if since > oldest and not c.closed]
            for since, c in idle:
                if since <= oldest or c.closed:
                    self._drop(c)
            self._idle_count -= len(idle) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def _drop(self, conn: http11.StreamConnection) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        self._idle_count = 0
        await asyncio.sleep(0)  # let closing TLS transports finish
