"""fileserver.storage.http11's pool against real 127.0.0.1 servers that misbehave on purpose.

Each server is an asyncio TCP (or TLS) server whose handler is the test's; it counts the
connections it accepts, how many are open at once, and the connections the client closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from fileserver.storage.http11 import (
    ConnectError,
    Pool,
    ProtocolError,
    RequestTimeout,
    Response,
    ServerDisconnected,
)
from tests.integration.test_hostile_sources import CA_PEM, GW_TEST_CERT_PEM, GW_TEST_KEY_PEM

Request = tuple[str, str, dict[str, str], bytes]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """Counts connections: accepted, open at once (max), and closed by the client."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.live = 0
        self.max_live = 0
        self.client_closed = 0
        self.requests: list[Request] = []
        self.got_request = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.live -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request on the connection, or None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.client_closed += 1
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((method, target, headers, body))
        self.got_request.set()
        return method, target, headers, body

    async def wait_client_close(self, reader: asyncio.StreamReader) -> None:
        """Wait until the client closes (or resets) the connection."""
        with suppress(ConnectionError):
            await reader.read()
        self.client_closed += 1


async def wait_for_client_close(srv: Server) -> None:
    """Wait (up to 5 s) until the server saw the client close one connection."""
    for _ in range(250):
        if srv.client_closed:
            break
        await asyncio.sleep(0.02)
    assert srv.client_closed == 1


def reply(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    """Keep-alive: answers each request with its target and the md5 of its body."""
    while (request := await srv.read_request(reader)) is not None:
        _method, target, _headers, body = request
        if target.startswith("/slow"):
            await asyncio.sleep(0.05)
        writer.write(reply(f"{target} {hashlib.md5(body).hexdigest()}".encode()))


@asynccontextmanager
async def running(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    srv = Server(handler)
    server = await asyncio.start_server(srv.serve, "127.0.0.1", 0, ssl=tls)
    try:
        srv.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        yield srv
    finally:
        server.close()


def pool_for(srv: Server, **kw: Any) -> Pool:
    return Pool(f"http://127.0.0.1:{srv.port}", **kw)  # type: ignore[attr-defined]


async def put(pool: Pool, target: str, body: bytes = b"", timeout_s: float = 5) -> Response:
    return await pool.request("PUT", target, {"X-Test": "1"}, body, timeout_s=timeout_s)


async def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async with running(echo) as srv:
        pool = pool_for(srv)
        for i in range(20):
            body = bytes([i]) * (1000 * i)
            response = await put(pool, f"/b/k{i}", body)
            assert response.status == 200
            assert response.body == f"/b/k{i} {hashlib.md5(body).hexdigest()}".encode()
        method, _target, headers, _body = srv.requests[0]
        assert method == "PUT" and headers["host"] == f"127.0.0.1:{srv.port}"  # type: ignore[attr-defined]
        assert headers["x-test"] == "1"
        assert srv.accepted == 1 and pool.open_connections == 1
        await pool.aclose()
        assert pool.open_connections == 0


async def test_concurrent_requests_stay_within_the_limit_and_reuse_connections() -> None:
    async with running(echo) as srv:
        pool = pool_for(srv, limit=3)
        responses = await asyncio.gather(*(put(pool, f"/slow/{i}", b"x") for i in range(12)))
        assert sorted(r.body.split()[0] for r in responses) == sorted(
            f"/slow/{i}".encode() for i in range(12)
        )
        assert srv.max_live == 3 and srv.accepted == 3
        await pool.aclose()


async def test_a_kept_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def one_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(reply(b"ok"))
        await writer.drain()  # then closes: an idle timeout on the server's side

    async with running(one_then_close) as srv:
        pool = pool_for(srv)
        assert (await put(pool, "/1")).body == b"ok"
        for _ in range(50):  # until the client saw the FIN
            if pool.open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert (await put(pool, "/2")).body == b"ok"
        assert srv.accepted == 2 and [r[1] for r in srv.requests] == ["/1", "/2"]
        await pool.aclose()


async def test_a_request_lost_on_a_reused_connection_is_sent_again_once() -> None:
    """The race a pool cannot avoid: the server closes a kept connection just as the next
    request goes out on it. No byte of a response came back, so it is sent again."""

    async def answer_one_drop_next(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(reply(b"ok"))
        await srv.read_request(reader)  # the second request: closed without an answer

    async with running(answer_one_drop_next) as srv:
        pool = pool_for(srv)
        assert (await put(pool, "/1")).body == b"ok"
        assert (await put(pool, "/2", b"payload")).body == b"ok"
        assert srv.accepted == 2
        # the server read "/2" twice: on the dropped connection, then on the new one
        assert [(r[1], r[3]) for r in srv.requests] == [
            ("/1", b""),
            ("/2", b"payload"),
            ("/2", b"payload"),
        ]
        await pool.aclose()


async def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_loop() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)

    async with running(drop) as srv:
        pool = pool_for(srv)
        with pytest.raises(ServerDisconnected, match="before the end of the response"):
            await put(pool, "/x")
        assert srv.accepted == 1 and pool.open_connections == 0
        await pool.aclose()


async def test_a_response_cut_midway_is_not_sent_again() -> None:
    """Part of the response came back: the server acted on the request; no retry."""

    async def ok_then_cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(reply(b"ok"))
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()

    async with running(ok_then_cut) as srv:
        pool = pool_for(srv)
        await put(pool, "/1")
        with pytest.raises(ServerDisconnected) as cut:
            await put(pool, "/2")
        assert cut.value.before_response is False
        assert srv.accepted == 1 and [r[1] for r in srv.requests] == ["/1", "/2"]
        await pool.aclose()


async def test_a_server_that_never_answers_times_out_and_the_connection_is_closed() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        await srv.wait_client_close(reader)

    async with running(hang) as srv:
        pool = pool_for(srv)
        with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
            await put(pool, "/x", timeout_s=0.3)
        assert pool.open_connections == 0
        await wait_for_client_close(srv)
        await pool.aclose()


async def test_a_cancelled_request_closes_its_connection_and_the_pool_goes_on() -> None:
    async def hang_or_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        while (request := await srv.read_request(reader)) is not None:
            if request[1] == "/hang":
                await srv.wait_client_close(reader)
                return
            writer.write(reply(b"ok"))

    async with running(hang_or_echo) as srv:
        pool = pool_for(srv, limit=1)
        task = asyncio.create_task(put(pool, "/hang"))
        await asyncio.wait_for(srv.got_request.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        await wait_for_client_close(srv)
        assert (await put(pool, "/ok")).body == b"ok"  # the only slot was given back
        assert srv.accepted == 2
        await pool.aclose()


async def test_chunked_and_close_delimited_responses() -> None:
    async def framings(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        while (request := await srv.read_request(reader)) is not None:
            if request[1] == "/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                )
            else:  # no length: the body ends when the server closes
                writer.write(b"HTTP/1.1 503 Slow Down\r\n\r\n<Code>SlowDown</Code>")
                return

    async with running(framings) as srv:
        pool = pool_for(srv)
        assert (await put(pool, "/chunked")).body == b"abcde"
        assert (await put(pool, "/chunked")).body == b"abcde"
        assert srv.accepted == 1
        closing = await put(pool, "/close")
        assert (closing.status, closing.body) == (503, b"<Code>SlowDown</Code>")
        assert pool.open_connections == 0
        assert (await put(pool, "/chunked")).body == b"abcde"
        assert srv.accepted == 2
        await pool.aclose()


async def test_garbage_from_the_server_is_a_protocol_error() -> None:
    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"220 smtp.example ESMTP ready\r\n\r\n")
        await srv.wait_client_close(reader)

    async with running(garbage) as srv:
        pool = pool_for(srv)
        with pytest.raises(ProtocolError, match=r"invalid HTTP/1\.1 response: Expected HTTP/"):
            await put(pool, "/x")
        assert pool.open_connections == 0
        await pool.aclose()


async def test_a_content_length_that_is_not_ascii_digits_is_named_not_a_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Content-Length: ²`` (0xB2 passes str.isdigit()) once raised ValueError inside
    data_received: asyncio logged a fatal error and the caller read "server closed the
    connection". It is a ProtocolError naming the header, and nothing is logged."""

    async def superscript(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok")
        await srv.wait_client_close(reader)

    async with running(superscript) as srv:
        pool = pool_for(srv)
        with pytest.raises(ProtocolError, match="Invalid character in Content-Length") as info:
            await put(pool, "/x")
        assert not isinstance(info.value, ServerDisconnected)
        assert pool.open_connections == 0
        await wait_for_client_close(srv)
        await pool.aclose()
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_nothing_listening_is_a_connect_error() -> None:
    from fileserver.devstack.servers import free_port

    pool = Pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectError, match=r"cannot connect to http://127\.0\.0\.1"):
        await put(pool, "/x")
    await pool.aclose()
    with pytest.raises(ConnectError, match="closed"):
        await put(pool, "/x")


# --- TLS -------------------------------------------------------------------------------


@pytest.fixture
def server_tls(tmp_path: Path) -> ssl.SSLContext:
    (tmp_path / "cert.pem").write_text(GW_TEST_CERT_PEM)
    (tmp_path / "key.pem").write_text(GW_TEST_KEY_PEM)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


@pytest.fixture
def gw_test_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gw.test`` (the name in the test certificate) resolves to 127.0.0.1."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kw: Any) -> Any:
        return real("127.0.0.1" if host == "gw.test" else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


async def test_https_with_a_trusted_certificate(
    server_tls: ssl.SSLContext, gw_test_is_loopback: None
) -> None:
    async with running(echo, tls=server_tls) as srv:
        pool = Pool(
            f"https://gw.test:{srv.port}",  # type: ignore[attr-defined]
            ssl_context=ssl.create_default_context(cadata=CA_PEM),
        )
        assert (await put(pool, "/a", b"x")).body.startswith(b"/a ")
        assert (await put(pool, "/b", b"y")).body.startswith(b"/b ")
        assert srv.accepted == 1
        assert srv.requests[0][2]["host"] == f"gw.test:{srv.port}"  # type: ignore[attr-defined]
        await pool.aclose()


async def test_https_refuses_an_untrusted_or_misnamed_certificate(
    server_tls: ssl.SSLContext, gw_test_is_loopback: None
) -> None:
    async with running(echo, tls=server_tls) as srv:
        port = srv.port  # type: ignore[attr-defined]
        untrusted = Pool(f"https://gw.test:{port}")  # the system's CAs
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await put(untrusted, "/a")
        misnamed = Pool(
            f"https://127.0.0.1:{port}", ssl_context=ssl.create_default_context(cadata=CA_PEM)
        )
        with pytest.raises(ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            await put(misnamed, "/a")
        assert srv.requests == []
        await untrusted.aclose()
        await misnamed.aclose()


# --- the S3 putter over TLS, as the worker builds it -------------------------------------


async def s3_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    """Answers every PUT like S3 does (200, an ETag, no body)."""
    while (request := await srv.read_request(reader)) is not None:
        etag = hashlib.md5(request[3]).hexdigest()
        writer.write(reply(b"", extra=f'ETag: "{etag}"\r\n'))


@pytest.mark.parametrize("transport", ["aiohttp", "http11"])
@pytest.mark.parametrize("verify", ["ca", "system", "off"])
async def test_s3_putter_follows_fileserver_s3_verify(
    server_tls: ssl.SSLContext,
    gw_test_is_loopback: None,
    tmp_path: Path,
    transport: str,
    verify: str,
) -> None:
    import boto3

    from fileserver.errors import DependencyUnavailable
    from fileserver.runtime import make_s3_client, make_s3_putter
    from fileserver.settings import Settings

    (tmp_path / "ca.pem").write_text(CA_PEM)
    async with running(s3_ok, tls=server_tls) as srv:
        settings = Settings(
            s3_endpoint_url=f"https://gw.test:{srv.port}",  # type: ignore[attr-defined]
            s3_region="us-east-1",
            s3_bucket="rec",
            s3_transport=transport,
            s3_verify={"ca": str(tmp_path / "ca.pem"), "system": True, "off": False}[verify],
        )
        session = boto3.session.Session(aws_access_key_id="AK", aws_secret_access_key="SK")
        putter = make_s3_putter(settings, make_s3_client(settings, session), session)
        body = b"ID3 not really audio"
        md5 = hashlib.md5(body).hexdigest()
        try:
            if verify == "system":  # the test CA is not among the system's
                with pytest.raises(DependencyUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                    await putter.put("1/2/x.mp3", body, md5, "audio/mpeg", {"uid": "2"})
                assert srv.requests == []
                return
            await putter.put("1/2/x.mp3", body, md5, "audio/mpeg", {"uid": "2"})
        finally:
            await putter.sender.aclose()
        method, target, headers, got = srv.requests[0]
        assert (method, target, got) == ("PUT", "/rec/1/2/x.mp3", body)
        assert headers["host"] == f"gw.test:{srv.port}"  # type: ignore[attr-defined]
        assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AK/")
        assert headers["x-amz-meta-uid"] == "2" and headers["content-type"] == "audio/mpeg"
