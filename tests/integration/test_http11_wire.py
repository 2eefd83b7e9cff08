"""The http11 download wire (:class:`fileserver.wires.Http11Wire`) on its own, against an
asyncio server on 127.0.0.1 that keeps connections alive: what the Fetcher tests cannot
see (connection reuse, flow control, the read-timeout timer, the connection limit).
The wire's behaviour under the Fetcher, beside the other wires, is in test_fetch.py and
test_hostile_sources.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fileserver.storage import http11
from fileserver.wires import REQUEST_HEADERS, Http11Wire, WireError

Handler = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection


@dataclass
class Server:
    """Serves ``routes`` (path -> handler) with keep-alive; records what it saw."""

    routes: dict[str, Handler] = field(default_factory=dict)
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    heads: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            writer.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                path = head.split(b" ", 2)[1].decode()
                handler = self.routes.get(path, reply(404, b"not here"))
                if not await handler(writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test ended (asyncio logs a cancelled handler)
        finally:
            self.open_now -= 1
            writer.close()


def reply(status: int, body: bytes, *, close: bool = False) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> bool:
        extra = b"Connection: close\r\n" if close else b""
        head = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra)
        writer.write(head + body)
        await writer.drain()
        return not close

    return handler


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = await Server().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def wire() -> AsyncIterator[Http11Wire]:
    w = Http11Wire(max_connections=4, connect_timeout_s=2, read_timeout_s=2)
    yield w
    await w.aclose()


async def get(wire: Http11Wire, url: str, *, read: bool = True) -> tuple[int, bytes]:
    resp = await wire.get(url, host_header="gw.test", sni_hostname=None)
    try:
        body = b"".join([c async for c in resp.chunks()]) if read else b""
        return resp.status, body
    finally:
        await resp.aclose()


async def test_the_request_is_what_the_other_wires_send(wire: Http11Wire, server: Server) -> None:
    server.routes["/a b/é.mp3?x=1"] = reply(200, b"x")  # never matched: sent encoded
    server.routes["/a%20b/%C3%A9.mp3?x=1"] = reply(200, b"audio")
    assert await get(wire, server.url("/a b/é.mp3?x=1")) == (200, b"audio")
    lines = server.heads[0].decode().split("\r\n")
    assert lines[0] == "GET /a%20b/%C3%A9.mp3?x=1 HTTP/1.1"
    assert lines[1:-2] == ["Host: gw.test", *(f"{k}: {v}" for k, v in REQUEST_HEADERS.items())]


async def test_keep_alive_connections_are_reused_after_a_complete_response(
    wire: Http11Wire, server: Server
) -> None:
    server.routes["/a.mp3"] = reply(200, b"audio")
    server.routes["/moved"] = reply(302, b"")  # no body: complete with its head
    for path in ("/a.mp3", "/moved", "/a.mp3", "/nothing"):  # the 404's body is not read
        await get(wire, server.url(path), read=path == "/a.mp3")
    assert server.connections == 1 and wire.open_connections == 1


async def test_pools_are_per_host_name_too(wire: Http11Wire, server: Server) -> None:
    """Two names on one address and port never share a connection (with TLS, one
    verified for one name never carries the other's request); each reuses its own."""
    server.routes["/a.mp3"] = reply(200, b"audio")
    for name in ("a.test", "b.test", "a.test", "b.test"):
        resp = await wire.get(server.url("/a.mp3"), host_header=name, sni_hostname=None)
        assert b"".join([c async for c in resp.chunks()]) == b"audio"
        await resp.aclose()
    assert server.connections == 2
    hosts = [h.split(b"\r\n")[1] for h in server.heads]
    assert hosts == [b"Host: a.test", b"Host: b.test"] * 2


async def test_a_body_not_read_to_the_end_closes_the_connection(
    wire: Http11Wire, server: Server
) -> None:
    server.routes["/big.mp3"] = reply(200, b"z" * 5_000_000)
    server.routes["/a.mp3"] = reply(200, b"audio")
    resp = await wire.get(server.url("/big.mp3"), host_header="gw.test", sni_hostname=None)
    async for _chunk in resp.chunks():
        break  # the consumer gives up (too large, ...)
    await resp.aclose()
    assert wire.open_connections == 0
    assert await get(wire, server.url("/a.mp3")) == (200, b"audio")
    assert server.connections == 2


async def test_connection_close_and_bytes_after_the_response_are_not_reused(
    wire: Http11Wire, server: Server
) -> None:
    async def extra(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK")
        return True

    server.routes["/close"] = reply(200, b"bye", close=True)
    server.routes["/extra"] = extra
    for path in ("/close", "/extra", "/close"):
        await get(wire, server.url(path))
    assert server.connections == 3


async def test_a_kept_connection_closed_by_the_server_is_replaced_once(
    wire: Http11Wire, server: Server
) -> None:
    server.routes["/a.mp3"] = reply(200, b"audio")
    assert await get(wire, server.url("/a.mp3")) == (200, b"audio")
    for writer in server.writers:  # the server drops its idle connection
        writer.close()
    await asyncio.sleep(0.05)
    assert await get(wire, server.url("/a.mp3")) == (200, b"audio")
    assert server.connections == 2


async def test_a_large_body_streams_with_flow_control(wire: Http11Wire, server: Server) -> None:
    """16 MiB: the wire pauses reading while more than its high-water mark waits, and
    never holds much more than that; the body arrives whole."""
    data = bytes(range(256)) * (64 * 1024)
    server.routes["/big.mp3"] = reply(200, data)
    resp = await wire.get(server.url("/big.mp3"), host_header="gw.test", sni_hostname=None)
    conn = next(iter(wire._open))
    await asyncio.sleep(0.3)  # nobody reads: the server fills the buffers, then waits
    assert conn._paused
    held = conn._queued
    assert http11.HIGH_WATER < held <= http11.HIGH_WATER + 512 * 1024
    digest, size, largest = hashlib.md5(), 0, 0
    async for chunk in resp.chunks():
        digest.update(chunk)
        size += len(chunk)
        largest = max(largest, len(chunk))
    await resp.aclose()
    assert (size, digest.hexdigest()) == (len(data), hashlib.md5(data).hexdigest())
    assert largest <= http11.HIGH_WATER + 512 * 1024
    assert server.connections == 1 and wire.open_connections == 1  # kept: read to the end


async def test_the_read_timeout_bounds_the_servers_silence_with_one_timer(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.1 s for 1.5 s under a 0.5 s read timeout: no timeout, and the timer
    is armed about once per read timeout, not once per read. Then silence before the
    head: ``ReadTimeout`` after the read timeout."""

    async def drip(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n")
        for _ in range(15):
            await asyncio.sleep(0.1)
            writer.write(b"z")
        return True

    async def silent(writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    server.routes["/drip"] = drip
    server.routes["/silent"] = silent
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., object], *args: object, **kw: Any) -> Any:
        nonlocal armed
        if getattr(callback, "__name__", "") == "_on_timer":
            armed += 1
        return call_at(when, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_at", counting)
    wire = Http11Wire(max_connections=2, connect_timeout_s=2, read_timeout_s=0.5)
    try:
        assert await get(wire, server.url("/drip")) == (200, b"z" * 15)
        assert 1 <= armed <= 5  # 15 reads
        start = loop.time()
        with pytest.raises(WireError) as info:
            await wire.get(server.url("/silent"), host_header="gw.test", sni_hostname=None)
        assert (info.value.kind, info.value.timeout, info.value.connect) == (
            "ReadTimeout",
            True,
            False,
        )
        assert 0.4 < loop.time() - start < 2
        assert wire.open_connections == 0  # the drip's, kept, reused, closed by the timeout
    finally:
        await wire.aclose()


async def test_a_paused_reader_is_not_a_silent_server(server: Server) -> None:
    """The read timeout is the server's silence: a consumer slower than the timeout,
    with reading paused, does not time the download out."""
    data = b"y" * (4 * 1024 * 1024)
    server.routes["/big.mp3"] = reply(200, data)
    wire = Http11Wire(max_connections=2, connect_timeout_s=2, read_timeout_s=0.3)
    try:
        resp = await wire.get(server.url("/big.mp3"), host_header="gw.test", sni_hostname=None)
        size = 0
        async for chunk in resp.chunks():
            size += len(chunk)
            if size < 2 * http11.HIGH_WATER:
                await asyncio.sleep(0.5)  # paused meanwhile, longer than the timeout
        await resp.aclose()
        assert size == len(data)
    finally:
        await wire.aclose()


async def test_at_most_max_connections_in_flight(server: Server) -> None:
    async def slow(writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.2)
        return await reply(200, b"audio")(writer)

    server.routes["/slow"] = slow
    wire = Http11Wire(max_connections=2, connect_timeout_s=2, read_timeout_s=2)
    try:
        results = await asyncio.gather(*(get(wire, server.url("/slow")) for _ in range(6)))
        assert results == [(200, b"audio")] * 6
        assert server.peak_open == 2 and server.connections == 2
    finally:
        await wire.aclose()


async def test_cancelled_while_waiting_for_the_head_frees_the_connection_and_slot(
    server: Server,
) -> None:
    async def silent(writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    server.routes["/silent"] = silent
    server.routes["/a.mp3"] = reply(200, b"audio")
    wire = Http11Wire(max_connections=1, connect_timeout_s=2, read_timeout_s=10)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await wire.get(server.url("/silent"), host_header="gw.test", sni_hostname=None)
        assert wire.open_connections == 0
        assert await get(wire, server.url("/a.mp3")) == (200, b"audio")  # the slot is free
    finally:
        await wire.aclose()


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "RemoteProtocolError", "peer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "RemoteProtocolError", "invalid HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "RemoteProtocolError", "Content"),
        (b"", "RemoteProtocolError", "server disconnected"),
    ],
    ids=["short-body", "not-http", "bad-length", "closed-before-head"],
)
async def test_errors_are_wire_errors_of_the_same_kinds(
    wire: Http11Wire, server: Server, raw: bytes, kind: str, message: str
) -> None:
    async def handler(writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return False

    server.routes["/x"] = handler
    with pytest.raises(WireError) as info:
        await get(wire, server.url("/x"))
    assert info.value.kind == kind and message in info.value.message
    assert not info.value.connect and not info.value.timeout
    assert wire.open_connections == 0


async def test_connect_errors_name_the_address(wire: Http11Wire) -> None:
    from fileserver.devstack.servers import free_port

    with pytest.raises(WireError) as info:
        await get(wire, f"http://127.0.0.1:{free_port()}/a.mp3")
    assert (info.value.kind, info.value.connect) == ("ConnectError", True)
    assert "127.0.0.1" in info.value.message
