"""A small HTTP/1.1 client: one origin, a keep-alive pool of asyncio protocol connections.

Why it exists: speed. It carries the S3 PUTs of ``FILESERVER_S3_TRANSPORT=http11`` (the
default; :mod:`fileserver.storage.s3_put`). Measured per 9 KB PUT to SeaweedFS (client
CPU, concurrency 32, 3,000 PUTs; issue 16): ~250 µs here against ~490 µs for the aiohttp
path, ~550 µs for awscrt's S3 client and ~2,800 µs for boto3 with 8 threads, because it
does only what that path needs. Scope, on purpose: one origin (scheme, host, port) per
:class:`Pool`; a request body already in memory; a response read whole into memory up
to a cap. No redirects, proxies, cookies, compression, ``Expect: 100-continue``,
pipelining or HTTP/2.

It also carries the downloads of ``FILESERVER_HTTP_TRANSPORT=http11``
(:class:`fileserver.wires.Http11Wire`): there a response is *streamed*, on a
:class:`StreamConnection` opened by :func:`open_stream`: the parser hands each piece of
the body to the connection as it is parsed, the reader takes them with
:meth:`StreamConnection.take` (reading from the socket pauses while more than
``high_water`` bytes wait), and a read timeout bounds the silence between two reads of
the socket (one timer per request, re-armed only when it fires early). A recording of
1 GiB is never held whole.

The bytes from the network are parsed by ``httptools`` (llhttp, the maintained parser
behind aiohttp and uvicorn), not by this module: the hand-written parser it replaced let
``Content-Length: ²`` through to a ``ValueError``, the class of bug fuzzing finds.
:class:`ResponseParser` only adds what a client decides. The framing is llhttp's
(``Transfer-Encoding: chunked``, else ``Content-Length``, else until the server closes;
no body for HEAD, 204 and 304; interim 1xx responses skipped), plus size limits. A
connection is kept for the next request only when the response was HTTP/1.1, said
nothing against it, had one framing and was read exactly to its end. A kept connection
that the server closed while it was idle is detected on reuse (:class:`ServerDisconnected`
before any byte of the response), and the request is sent again once on a new
connection; PUTs and DELETEs are idempotent. A timeout or a cancellation closes the
connection it was using.

Exceptions::

    HTTPError
    ├── ConnectError            the connection (TCP or TLS) could not be opened
    │   └── ConnectTimeout      ... within the pool's connect timeout
    ├── RequestTimeout          no complete response within the request's timeout
    ├── ReadTimeout             (streamed) no byte from the server within the read timeout
    └── ProtocolError           the response broke HTTP/1.1 framing or a limit
        └── ServerDisconnected  the server closed the connection before the response ended

Invalid header names or values (CR, LF, ...) raise :class:`ValueError` before anything
is sent. The parser does no I/O; whatever bytes it is fed, it returns a response or
raises :class:`ProtocolError` (fuzzed in tests/unit/test_http11.py); streamed, it hands
over the body's pieces and then ends or raises :class:`ProtocolError` (fuzzed too).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HTTPError(Exception):
    """Base of the errors of this client."""


class ConnectError(HTTPError):
    """The TCP connection or the TLS handshake failed."""


class ConnectTimeout(ConnectError):
    """The connection was not open within the pool's connect timeout."""


class RequestTimeout(HTTPError):
    """No complete response arrived within the request's timeout."""


class ReadTimeout(HTTPError):
    """A streamed response: the server sent nothing within the connection's read timeout."""


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


@dataclass(frozen=True, slots=True)
class Head:
    """The final head of a streamed response (header names lower-case, as in
    :class:`Response`)."""

    status: int
    reason: str
    headers: dict[str, str]


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


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: bytes after the response."""


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response on llhttp (no I/O).

    :meth:`feed` returns the :class:`Response` once it is complete (``None`` before);
    :meth:`feed_eof` is called when the server closes the connection. Anything llhttp
    refuses, and anything over a limit, is a :class:`ProtocolError`: the head (status
    line and headers, interim responses included) within ``max_head`` bytes, the
    framing (chunk lines, trailers) within ``max_head`` bytes more, the body within
    ``max_body`` (``None``: no limit; the reader counts).

    Streamed (``on_body`` given): each piece of the body is passed to ``on_body`` as it
    is parsed instead of being kept (the :class:`Response` returned at the end has an
    empty body), and :attr:`head` is the final head as soon as it is complete.
    ``on_body`` must not raise. The framing limit then applies between two pieces of
    the body (give or take the bytes of one :meth:`feed`), not to the whole response: a
    1 GiB body sent in 8 KiB chunks has 1 MiB of chunk lines; endless chunk lines,
    extensions or trailers are still refused.
    """

    def __init__(
        self,
        *,
        no_body: bool = False,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int | None = MAX_BODY_BYTES,
        on_body: Callable[[bytes], None] | None = None,
    ) -> None:
        self._no_body = no_body  # a HEAD request: the response has no body whatever it says
        self._max_head = max_head
        self._max_body = max_body
        self._on_body = on_body
        self._body_size = 0
        self._framing_mark = 0  # streamed: the overhead when the last body piece came
        self.head: Head | None = None  # streamed: the final head once complete
        # Holds this object's bound callbacks: a reference cycle, broken in _result (the
        # response read) so the two are freed at once, not by the garbage collector.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        # Both Content-Length and Transfer-Encoding: read as chunked (RFC 9112 6.3),
        # and the connection is not kept (below). The only leniency: llhttp's header
        # leniency, which would read folded lines (obs-fold) as aiohttp does, also lets
        # "Content-Length : 1" and control bytes through, the material of a response
        # read with another length than the server meant on a kept connection; lines
        # ended by a lone LF likewise. Such a source is retried, then dead-lettered.
        self._parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._fed = 0
        self._in_head = True  # until the final (non-1xx) head is complete
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._until_close = False
        self._chunks = 0
        self._keep_alive = False
        self._complete = False  # the response is read (returned once, by feed)
        self._returned = False
        self._extra = False  # bytes came after the response
        self._error: ProtocolError | None = None
        self.received_any = False

    def feed(self, data: bytes) -> Response | None:
        """Add bytes from the connection; the response once it is complete."""
        if self._returned:
            return None  # the connection, not the parser, refuses bytes after the response
        if self._error is not None:
            raise self._error
        if data:
            self.received_any = True
            self._fed += len(data)
        parser = self._parser
        assert parser is not None  # dropped only once the response is returned
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._error is not None:  # a callback refused the response
                raise self._error from None
            bug = exc.__context__
            if bug is not None and not isinstance(bug, _Stop):
                raise bug from exc  # a callback failed: fileserver's bug, not the bytes
            if not self._complete:
                raise self._fail(f"invalid HTTP/1.1 response: {exc}") from None
            self._extra = True  # after the response, bytes that are not one
        if self._complete:
            return self._result()
        overhead = self._fed - self._body_size
        if self._in_head:
            limit = self._max_head
        elif self._on_body is None:
            limit = 2 * self._max_head
        else:  # streamed: any size of body, so the framing between two pieces of it
            limit = self._framing_mark + self._max_head
        if overhead > limit:
            what = "head" if self._in_head else "framing (chunk lines, trailers)"
            self._error = ProtocolError(f"response {what} over {self._max_head} bytes")
            raise self._error
        return None

    def feed_eof(self) -> Response:
        """The server closed the connection: the response if it ends there, else raise."""
        if self._returned:
            raise ServerDisconnected("connection closed after the response", before_response=False)
        if self._error is None and not self._in_head and self._until_close and not self._chunks:
            self._complete, self._keep_alive = True, False
            return self._result()
        raise ServerDisconnected(
            "the server closed the connection before the end of the response",
            before_response=not self.received_any,
        )

    def _result(self) -> Response:
        self._returned = True
        self._parser = None  # nothing is parsed after this (feed, feed_eof check _returned)
        return Response(
            self._status,
            self._reason,
            self._headers,
            bytes(self._body),
            self._keep_alive and not self._extra,
        )

    def _fail(self, message: str) -> ProtocolError:
        self._error = ProtocolError(message)
        return self._error

    # -- llhttp's callbacks (called from feed_data)

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True
            raise _Stop
        self._reason, self._headers = "", {}

    def on_status(self, status: bytes) -> None:
        self._reason += status.decode("latin-1")  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers: ignored
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called from feed_data
        version, status = parser.get_http_version(), parser.get_status_code()
        if version not in ("1.0", "1.1"):
            raise self._fail(f"not an HTTP/1.x response: HTTP/{version}")
        if status < 100:
            raise self._fail(f"invalid status code {status}")
        if status < 200:
            if status == 101:
                raise self._fail("unexpected 101 Switching Protocols")
            return  # an interim response (100 Continue, 103 ...): the real one follows
        self._in_head, self._status = False, status
        headers = self._headers
        if self._on_body is not None:
            self.head = Head(status, self._reason, headers)
            self._framing_mark = self._fed
        both = "transfer-encoding" in headers and "content-length" in headers
        self._keep_alive = version == "1.1" and not both and parser.should_keep_alive()
        if self._no_body or status in (204, 304):
            self._complete = True  # llhttp may still expect a body: any byte is _extra
            return
        if "transfer-encoding" in headers:
            last = headers["transfer-encoding"].rsplit(",", 1)[-1].strip().lower()
            self._until_close = last != "chunked"
        elif "content-length" in headers:
            length = headers["content-length"]  # llhttp checked it: digits, one value
            if not (length.isascii() and length.isdigit()):
                raise self._fail(f"invalid Content-Length {length[:40]!r}")
            if self._max_body is not None and int(length) > self._max_body:
                raise self._fail(f"response body over {self._max_body} bytes")
        else:
            self._until_close = True

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._extra = True
            raise _Stop
        self._body_size += len(body)
        if self._max_body is not None and self._body_size > self._max_body:
            raise self._fail(f"response body over {self._max_body} bytes")
        if self._on_body is None:
            self._body += body
        elif body:  # llhttp reports an empty piece when fed nothing
            self._framing_mark = self._fed - self._body_size
            self._on_body(body)

    def on_message_complete(self) -> None:
        if self._in_head or self._complete:
            return  # an interim response ends, or llhttp ends a body we did not expect
        self._complete = True
        assert self._parser is not None  # called from feed_data
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()


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
        except Exception as exc:  # a ProtocolError; anything else is a bug, said as such
            if not isinstance(exc, ProtocolError):
                exc = ProtocolError(f"response parser failed: {type(exc).__name__}: {exc}")
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


# ---------------------------------------------------------------------- streamed responses

HIGH_WATER = 256 * 1024


_PIECE_OVERHEAD = 64  # a small bytes object and its list slot, rounded up


class StreamConnection(asyncio.Protocol):
    """One TCP (or TLS) connection whose responses are streamed; one request at a time.

    :meth:`send` writes a request; :meth:`response_head` waits for the final head;
    :meth:`take` returns the body bytes parsed so far and :meth:`readable` waits for more
    (or the end, or raises the error). While more than ``high_water`` bytes wait to be
    taken, reading from the socket is paused; it resumes when they are taken.

    The read timeout bounds the server's silence (before the head too), never the
    reader's: one timer per request, armed at :meth:`send`; when it fires it compares
    the time of the last read with the timeout and re-arms itself for the rest (paused,
    it waits a whole timeout more), so reading costs one clock read, not a timer.
    An error (timeout, :class:`ProtocolError`, :class:`ServerDisconnected`) closes the
    connection. :meth:`reusable` says whether the next request may use it: the response
    was read from the network exactly to its end and said keep-alive (bytes parsed but
    not taken do not matter: :meth:`reset` drops them).
    """

    def __init__(self, read_timeout_s: float, *, high_water: int = HIGH_WATER) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout_s
        self._high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.head: Head | None = None
        self.complete = False  # the response was read to its end
        self._keep_alive = False
        self._parser: ResponseParser | None = None  # while a response is being read
        self._pending: list[bytes] = []
        self._queued = 0
        self._paused = False
        self._error: HTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    # -- the reader's side

    def send(self, data: bytes) -> None:
        """Write one request (a GET: its response has a body unless 204 or 304)."""
        assert self.transport is not None and self._parser is None
        self._parser = ResponseParser(max_body=None, on_body=self._on_body)
        self._last_read = now = self._loop.time()
        self._timer = self._loop.call_at(now + self._read_timeout, self._on_timer)
        self.transport.write(data)

    async def response_head(self) -> Head:
        """The final head (interim 1xx responses skipped); raises :class:`HTTPError`."""
        while self.head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.head

    def take(self) -> bytes:
        """The body bytes parsed and not yet taken (``b""``: none now)."""
        pending = self._pending
        if not pending:
            return b""
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._queued = 0
        if self._paused:
            self._paused = False
            self._last_read = self._loop.time()  # the server's silence counts from now
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    async def readable(self) -> None:
        """Wait until bytes can be taken or the response is complete; raises its error."""
        while not self._pending and not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait()

    def reusable(self) -> bool:
        """Whether the next request may go on this connection."""
        transport = self.transport
        return (
            self.complete
            and self._keep_alive
            and self._error is None
            and not self.closed
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0  # request fully sent
        )

    def reset(self) -> None:
        """Forget the last response (:meth:`reusable` was true) for the next request."""
        self.head, self.complete, self._keep_alive = None, False, False
        self._pending.clear()
        self._queued = 0

    def close(self) -> None:
        self.closed = True
        self._parser = None
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the network's side

    def _on_body(self, body: bytes) -> None:
        self._pending.append(body)
        # Each piece is an object of its own: counted with its overhead, or a server
        # sending 2-byte chunks to a reader that does not take them held 8 MB per
        # connection before reading paused (32x the high-water mark).
        self._queued += len(body) + _PIECE_OVERHEAD

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self.close()  # bytes after the response, or on an idle connection
            return
        self._last_read = self._loop.time()
        try:
            response = parser.feed(data)
        except Exception as exc:  # a ProtocolError; anything else is a bug, said as such
            if not isinstance(exc, ProtocolError):
                exc = ProtocolError(f"response parser failed: {type(exc).__name__}: {exc}")
            self._fail(exc)
            return
        if self.head is None:
            self.head = parser.head
        if response is not None:
            self._done(response.keep_alive)
        elif self._queued > self._high_water and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        if self.head is not None:
            self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser = self._parser
        if parser is None:
            self._cancel_timer()
            return
        if exc is not None:  # a reset is not the end of a body delimited by the close
            before = not parser.received_any
            self._fail(ServerDisconnected(f"connection lost: {exc}", before_response=before))
            return
        try:
            parser.feed_eof()
        except ProtocolError as error:
            self._fail(error)
            return
        if self.head is None:
            self.head = parser.head
        self._done(False)
        self._wake()

    def _done(self, keep_alive: bool) -> None:
        self._parser = None
        self.complete, self._keep_alive = True, keep_alive
        self._cancel_timer()

    def _fail(self, error: HTTPError) -> None:
        self._error = error
        self._parser = None
        self.close()
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._parser is None:
            return
        now = self._loop.time()
        if self._paused:
            deadline = now + self._read_timeout  # the reader is slow, not the server
        else:
            deadline = self._last_read + self._read_timeout
            if deadline <= now:
                what = "response head" if self.head is None else "response body"
                self._fail(ReadTimeout(f"no data for {self._read_timeout:g} s (in the {what})"))
                return
        self._timer = self._loop.call_at(deadline, self._on_timer)


async def open_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    connect_timeout_s: float,
    read_timeout_s: float,
) -> StreamConnection:
    """A new :class:`StreamConnection` to ``host`` (a name or an IP address, no brackets)
    and ``port``; TLS with ``ssl_context``, verifying and sending as SNI
    ``server_hostname`` (``None``: ``host``; an IP address is verified, not sent).
    Raises :class:`ConnectTimeout` or :class:`ConnectError`."""
    return await _connect(
        lambda: StreamConnection(read_timeout_s),
        host,
        port,
        ssl_context=ssl_context,
        server_hostname=server_hostname if ssl_context is not None else None,
        timeout_s=connect_timeout_s,
        where=f"{host} port {port}",
    )


_P = TypeVar("_P", bound=asyncio.Protocol)


async def _connect(
    factory: Callable[[], _P],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout_s: float,
    where: str,
) -> _P:
    """A connection made by ``factory``; :class:`ConnectTimeout` or :class:`ConnectError`
    naming ``where``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _transport, conn = await loop.create_connection(
                factory, host, port, ssl=ssl_context, server_hostname=server_hostname
            )
    except TimeoutError:
        raise ConnectTimeout(f"connecting to {where} timed out after {timeout_s:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot connect to {where}: {exc}") from None
    return conn


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
        conn = await _connect(
            _Connection,
            self._host,
            self._port,
            ssl_context=self._ssl,
            server_hostname=self._host if self._ssl else None,
            timeout_s=self._connect_timeout,
            where=self.origin,
        )
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
