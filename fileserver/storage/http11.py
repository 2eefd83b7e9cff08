"""A small HTTP/1.1 client: one origin, a keep-alive pool of asyncio protocol connections.

It carries the S3 PUTs of ``FILESERVER_S3_TRANSPORT=http11`` (:mod:`fileserver.storage.s3_put`):
against SeaweedFS it spends about half the client CPU of aiohttp per PUT (README,
"Performance"), because it does only what that path needs. Scope, on purpose: one
origin (scheme, host, port) per :class:`Pool`; a request body already in memory; a
response read whole into memory up to a cap. No redirects, proxies, cookies,
compression, ``Expect: 100-continue``, pipelining or HTTP/2.

Responses are framed as RFC 9112 says: ``Transfer-Encoding: chunked``, else
``Content-Length``, else until the server closes. A connection is kept for the next
request only when the response said nothing against it and was read exactly to its end.
A kept connection that the server closed while it was idle is detected on reuse
(:class:`ServerDisconnected` before any byte of the response), and the request is sent
again once on a new connection; PUTs are idempotent. A timeout or a cancellation closes
the connection it was using.

Exceptions::

    HTTPError
    ├── ConnectError            the connection (TCP or TLS) could not be opened
    │   └── ConnectTimeout      ... within the pool's connect timeout
    ├── RequestTimeout          no complete response within the request's timeout
    └── ProtocolError           the response broke HTTP/1.1 framing or a limit
        └── ServerDisconnected  the server closed the connection before the response ended

Invalid header names or values (CR, LF, ...) raise :class:`ValueError` before anything
is sent. The parser (:class:`ResponseParser`) does no I/O.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HTTPError(Exception):
    """Base of the errors of this client."""


class ConnectError(HTTPError):
    """The TCP connection or the TLS handshake failed."""


class ConnectTimeout(ConnectError):
    """The connection was not open within the pool's connect timeout."""


class RequestTimeout(HTTPError):
    """No complete response arrived within the request's timeout."""


class ProtocolError(HTTPError):
    """The response is not valid HTTP/1.1, or exceeds a size limit."""


class ServerDisconnected(ProtocolError):
    """The server closed the connection before the end of the response."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


@dataclass(frozen=True)
class Response:
    """A whole response: header names are lower-case, repeated ones joined by ``", "``."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_header(url: str) -> str:
    """The ``Host`` header value for ``url``: the host in lower case (an IPv6 literal in
    brackets) and the port only when it is not the scheme's default.

    It is the value botocore signs and urllib3, aiohttp and curl send; a SigV4 signature
    covers the Host header, so whoever signs and whoever sends must agree on it exactly
    (``https://h:443`` is sent as ``h``, not ``h:443``).
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == {"http": 80, "https": 443}.get(parts.scheme):
        return host
    return f"{host}:{port}"


# ------------------------------------------------------------------------------ parser

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE, _DONE = range(7)


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response (no I/O).

    :meth:`feed` returns the :class:`Response` once it is complete (``None`` before);
    :meth:`feed_eof` is called when the server closes the connection.
    """

    def __init__(
        self,
        *,
        no_body: bool = False,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self._no_body = no_body  # a HEAD request: the response has no body whatever it says
        self._max_head = max_head
        self._max_body = max_body
        self._buf = bytearray()
        self._state = _HEAD
        self._need = 0
        self._body = bytearray()
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._keep_alive = False
        self.received_any = False

    def feed(self, data: bytes) -> Response | None:
        """Add bytes from the connection; the response once it is complete."""
        if self._state == _DONE:
            return None  # the connection, not the parser, refuses bytes after the response
        if data:
            self.received_any = True
            self._buf += data
        while True:
            state = self._state
            if state == _HEAD:
                if not self._read_head():
                    return None
            elif state == _LENGTH:
                if len(self._buf) < self._need:
                    return None
                self._take(self._need)
                return self._done()
            elif state == _CHUNK_SIZE:
                line = self._line(1024, "chunk size line")
                if line is None:
                    return None
                size_text = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_text):
                    raise ProtocolError(f"invalid chunk size line {bytes(line[:40])!r}")
                self._need = int(size_text, 16)
                if len(self._body) + self._need > self._max_body:
                    raise ProtocolError(f"response body over {self._max_body} bytes")
                self._state = _CHUNK_DATA if self._need else _TRAILERS
            elif state == _CHUNK_DATA:
                if len(self._buf) < self._need + 2:
                    return None
                if self._buf[self._need : self._need + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                self._take(self._need)
                del self._buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                line = self._line(self._max_head, "trailer line")
                if line is None:
                    return None
                if not line:
                    return self._done()
            else:  # _UNTIL_CLOSE
                self._take(len(self._buf))
                return None

    def feed_eof(self) -> Response:
        """The server closed the connection: the response if it ends there, else raise."""
        if self._state == _UNTIL_CLOSE:
            self._keep_alive = False
            return self._done()
        if self._state == _DONE:
            raise ServerDisconnected("connection closed after the response", before_response=False)
        raise ServerDisconnected(
            "the server closed the connection before the end of the response",
            before_response=not self.received_any,
        )

    # -- helpers

    def _take(self, n: int) -> None:
        if len(self._body) + n > self._max_body:
            raise ProtocolError(f"response body over {self._max_body} bytes")
        self._body += self._buf[:n]
        del self._buf[:n]

    def _line(self, limit: int, what: str) -> bytearray | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > limit:
                raise ProtocolError(f"{what} over {limit} bytes")
            return None
        line = self._buf[:end]
        del self._buf[: end + 2]
        return line

    def _done(self) -> Response:
        self._state = _DONE
        if self._buf:
            self._keep_alive = False
        return Response(
            self._status, self._reason, self._headers, bytes(self._body), self._keep_alive
        )

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0 or end > self._max_head:
            if len(self._buf) > self._max_head:
                raise ProtocolError(f"response head over {self._max_head} bytes")
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        minor, status = match.group(1), int(match.group(2))
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name_b, sep, value_b = raw.partition(b":")
            name = name_b.decode("latin-1")
            if not sep or not _TOKEN.fullmatch(name):
                raise ProtocolError(f"invalid header line {raw[:80]!r}")
            name, value = name.lower(), value_b.strip().decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            return True  # an interim response (100 Continue, 103 ...): the real one follows
        self._status = status
        self._reason = (match.group(3) or b"").decode("latin-1")
        self._headers = headers
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self._keep_alive = minor == b"1" and "close" not in tokens
        if self._no_body or status in (204, 304):
            self._state, self._need = _LENGTH, 0
        elif "transfer-encoding" in headers:
            codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
            if codings[-1] == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state, self._keep_alive = _UNTIL_CLOSE, False
            if "content-length" in headers:
                self._keep_alive = False  # both framings: do not trust the connection after
        elif "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise ProtocolError(f"invalid Content-Length {headers['content-length']!r}")
            self._need = int(values.pop())
            if self._need > self._max_body:
                raise ProtocolError(f"response body over {self._max_body} bytes")
            self._state = _LENGTH
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False
        return True


# -------------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, data: bytes, parser: ResponseParser) -> asyncio.Future[Response]:
        """Write one request; the future is the response (or the error)."""
        assert self.transport is not None and self._waiter is None
        self._parser = parser
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._waiter is None:
            self.close()  # bytes after the response, or on an idle connection
            return
        try:
            response = self._parser.feed(data)
        except ProtocolError as exc:
            self._settle(exc)
            self.close()
            return
        if response is not None:
            self._settle(response)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and self._waiter is not None:
            try:
                self._settle(self._parser.feed_eof())
            except ProtocolError as error:
                self._settle(error)

    def _settle(self, outcome: Response | BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, Response):
            waiter.set_result(outcome)
        else:
            waiter.set_exception(outcome)

    def reusable(self, response: Response) -> bool:
        """Whether the next request may go on this connection."""
        assert self.transport is not None
        return (
            response.keep_alive
            and not self.closed
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0  # request fully sent
        )

    def release(self) -> None:
        self._parser = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


# -------------------------------------------------------------------------------- pool


class Pool:
    """Keep-alive connections to one origin, at most ``limit`` open at a time."""

    def __init__(
        self,
        origin: str,
        *,
        limit: int = 100,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        """``origin`` is ``http://host[:port]`` or ``https://host[:port]`` (no path);
        ``ssl_context`` is used for https (the system's default context when ``None``)."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(f"an origin has no path, query or user: {origin!r}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host_header = host_header(origin)  # sent on every request
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._connect_timeout = connect_timeout_s
        self._max_body = max_body
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use."""
        return sum(1 for c in self._open if not c.closed)

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        timeout_s: float,
    ) -> Response:
        """Send one request (``target`` is the path, already quoted) and read the whole
        response within ``timeout_s`` seconds (waiting for a free connection included)."""
        data = self._encode(method, target, headers, body)
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                while self._idle:
                    conn = self._idle.pop()
                    if conn.closed or conn.transport is None or conn.transport.is_closing():
                        self._open.discard(conn)
                        continue
                    try:
                        return await self._exchange(conn, data, method)
                    except ServerDisconnected as exc:
                        if not exc.before_response:
                            raise
                        break  # closed by the server while idle: once more, on a new one
                return await self._exchange(await self._connect(), data, method)
        except TimeoutError:
            raise RequestTimeout(f"no complete response within {timeout_s:g} s") from None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectError("the pool is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _transport, conn = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"connecting to {self.origin} timed out after {self._connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {self.origin}: {exc}") from None
        self._open.add(conn)
        return conn

    async def _exchange(self, conn: _Connection, data: bytes, method: str) -> Response:
        parser = ResponseParser(no_body=method == "HEAD", max_body=self._max_body)
        try:
            response = await conn.send(data, parser)
        except BaseException:  # errors, timeouts, cancellation: the connection is unusable
            conn.close()
            self._open.discard(conn)
            raise
        if conn.reusable(response) and not self._closed:
            conn.release()
            self._idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        return response

    def _encode(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
        if (
            not _TOKEN.fullmatch(method)
            or not target.startswith("/")
            or " " in target
            or _BAD_VALUE.search(target)
        ):
            raise ValueError(f"invalid request line: {method!r} {target!r}")
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.host_header}",
            f"Content-Length: {len(body)}",
        ]
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise ValueError(f"invalid header {name!r}: {value[:80]!r}")
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                raise ValueError(f"header {name!r} is set by the client")
            lines.append(f"{name}: {value}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8") + body

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
