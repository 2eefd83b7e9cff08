"""The S3 paths against an S3 double on a real loopback socket.

* Host: the double checks each request's SigV4 signature against the ``Host`` header it
  actually received (as S3 does) and answers ``SignatureDoesNotMatch`` otherwise, for
  endpoints with an explicit default port (``http://127.0.0.1:80``,
  ``https://gw.test:443``, ``http://[::1]:80``), other ports and an upper-case host, on
  every transport (aiohttp, http11, boto3 as the reference).
* Deadlines: a double that accepts and never answers, and one that trickles its answer
  a byte a second, must not hold a PUT (either sender) or a boto3 call (put, multipart,
  HEAD, bucket check) longer than its deadline, and the error names the setting; nor
  must a port whose connections never open (a full listen backlog).

Ports 80 and 443 are bound for real (the tests run as root); a failure to bind fails
the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fileserver.errors import DependencyUnavailable
from fileserver.runtime import make_s3_client, make_s3_putter
from fileserver.settings import Settings
from fileserver.storage import ObjectStore
from fileserver.storage.s3_put import S3Putter
from tests.integration.test_hostile_sources import CA_PEM, GW_TEST_CERT_PEM, GW_TEST_KEY_PEM

ACCESS_KEY, SECRET_KEY, REGION, BUCKET = "AKWIRE", "wire-secret", "us-east-1", "rec"
Request = tuple[str, str, dict[str, str], bytes]
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<scope>[^,]+), "
    r"SignedHeaders=(?P<signed>[^,]+), Signature=(?P<signature>[0-9a-f]{64})"
)


def signature_ok(request: Request, *, tls: bool = False) -> bool:
    """What S3 checks: the signature recomputed by botocore from the headers received,
    the Host among them, and the body's SHA-256 against the signed one (over TLS,
    botocore leaves the payload unsigned when Content-MD5 covers it)."""
    method, target, headers, body = request
    match = _AUTH.fullmatch(headers.get("authorization", ""))
    if match is None or match["key"] != ACCESS_KEY:
        return False
    payload = headers.get("x-amz-content-sha256")
    unsigned_ok = tls and "content-md5" in headers
    if payload != hashlib.sha256(body).hexdigest() and not (
        unsigned_ok and payload == "UNSIGNED-PAYLOAD"
    ):
        return False
    signed = match["signed"].split(";")
    if "host" not in signed:
        return False
    received = AWSRequest(
        method,
        f"http://{headers['host']}{target}",
        data=body,
        headers={name: headers[name] for name in signed},
    )
    received.context["timestamp"] = headers["x-amz-date"]
    region = match["scope"].split("/")[1]  # the scope's: a region check is the caller's
    signer = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", region)
    canonical = signer.canonical_request(received)
    expected = signer.signature(signer.string_to_sign(received, canonical), received)
    return bool(expected == match["signature"])


class FakeS3:
    """An S3 double: ``mode`` is ``verify`` (200 when the signature is good, else 403
    ``SignatureDoesNotMatch``), ``silent`` (reads the request, never answers) or
    ``trickle`` (a valid answer, one byte per ``interval_s``). Multipart uploads are
    started and aborted for real; their part uploads get ``mode``."""

    def __init__(self, mode: str, *, interval_s: float = 1.0) -> None:
        self.mode = mode
        self.interval_s = interval_s
        self.requests: list[Request] = []
        self.verdicts: list[bool] = []
        self.port = 0
        self.tls = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def hosts(self) -> list[str]:
        return [headers.get("host", "") for _m, _t, headers, _b in self.requests]

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port, ssl=tls)
            self.tls = tls is not None
        except OSError as exc:
            pytest.fail(f"cannot bind {host} port {port} for the test: {exc}")
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:  # they end on the closed connections
            await asyncio.wait(self._handlers, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while (request := await self._read(reader, writer)) is not None:
                self.requests.append(request)
                answer = self._answer(request)
                if answer == "silent":
                    await reader.read()  # until the client gives up
                    return
                if answer == "trickle":
                    await self._trickle(reader, writer)
                    return
                assert isinstance(answer, bytes)
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return method, target, headers, body

    def _answer(self, request: Request) -> bytes | str:
        method, target, _headers, body = request
        if method == "POST" and target.endswith("?uploads"):
            xml = (
                "<InitiateMultipartUploadResult><Bucket>rec</Bucket><Key>k</Key>"
                "<UploadId>upload-1</UploadId></InitiateMultipartUploadResult>"
            )
            return reply(200, xml.encode())
        if method == "DELETE":
            return reply(204, b"")
        if self.mode != "verify":
            return self.mode
        ok = signature_ok(request, tls=self.tls)
        self.verdicts.append(ok)
        if ok:
            return reply(200, b"", etag=hashlib.md5(body).hexdigest())
        return reply(
            403, b"<Error><Code>SignatureDoesNotMatch</Code><Message>Host?</Message></Error>"
        )

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = reply(200, b"", etag="0" * 32)
        for i in range(len(answer)):
            if writer.is_closing() or reader.at_eof():
                return
            writer.write(answer[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.interval_s)


def reply(status: int, body: bytes, *, etag: str | None = None) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nx-amz-request-id: {'r' * 40}\r\n"
    if etag:
        head += f'ETag: "{etag}"\r\n'
    return (head + "\r\n").encode() + body


@asynccontextmanager
async def fake_s3(
    mode: str, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
) -> AsyncIterator[FakeS3]:
    server = FakeS3(mode)
    await server.start(host, port, tls)
    try:
        yield server
    finally:
        await server.stop()


def boto_session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


@contextmanager
def gw_test_is_loopback() -> Iterator[None]:
    """``gw.test`` (the name in the test certificate) resolves to 127.0.0.1."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kw: Any) -> Any:
        return real("127.0.0.1" if host == "gw.test" else host, *args, **kw)

    socket.getaddrinfo = resolve  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = real


def server_tls(tmp_path: Path) -> ssl.SSLContext:
    (tmp_path / "cert.pem").write_text(GW_TEST_CERT_PEM)
    (tmp_path / "key.pem").write_text(GW_TEST_KEY_PEM)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def put_once(transport: str, settings: Settings, body: bytes) -> None:
    """One PUT of ``body`` on ``transport``, wired as the worker wires it."""
    session = boto_session()
    client = make_s3_client(settings, session)
    md5 = hashlib.md5(body).hexdigest()
    if transport == "boto3":
        with ThreadPoolExecutor(2) as executor:
            await ObjectStore(client, BUCKET, executor).put_file("1/2/x.mp3", body, md5, {"u": "2"})
        return
    putter: S3Putter = make_s3_putter(settings, client, session)
    try:
        await putter.put("1/2/x.mp3", body, md5, "audio/mpeg", {"u": "2"})
    finally:
        await putter.sender.aclose()


TRANSPORTS = ["aiohttp", "http11", "boto3"]
# endpoint (PORT: the server's port), the address to bind, the Host S3 must receive
ENDPOINTS = [
    ("http://127.0.0.1:80", ("127.0.0.1", 80), "127.0.0.1"),
    ("http://127.0.0.1:PORT", ("127.0.0.1", 0), "127.0.0.1:PORT"),
    ("http://LOCALHOST:PORT", ("127.0.0.1", 0), "localhost:PORT"),
    ("http://[::1]:80", ("::1", 80), "[::1]"),
    ("http://[::1]:PORT", ("::1", 0), "[::1]:PORT"),
    ("https://gw.test:443", ("127.0.0.1", 443), "gw.test"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("endpoint", "bind", "host"), ENDPOINTS)
async def test_the_host_signed_is_the_host_received(
    transport: str, endpoint: str, bind: tuple[str, int], host: str, tmp_path: Path
) -> None:
    tls = server_tls(tmp_path) if endpoint.startswith("https") else None
    (tmp_path / "ca.pem").write_text(CA_PEM)
    body = b"ID3 not really audio" * 50
    with gw_test_is_loopback():
        async with fake_s3("verify", *bind, tls=tls) as s3:
            settings = Settings(
                s3_endpoint_url=endpoint.replace("PORT", str(s3.port)),
                s3_region=REGION,
                s3_bucket=BUCKET,
                s3_transport=transport,
                s3_verify=str(tmp_path / "ca.pem") if tls else True,
            )
            await put_once(transport, settings, body)
    assert s3.hosts == [host.replace("PORT", str(s3.port))]
    assert s3.verdicts == [True]
    _method, target, headers, got = s3.requests[0]
    assert target == "/rec/1/2/x.mp3" and got == body
    if transport != "boto3":  # the putter always signs the payload
        assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()


async def test_the_double_refuses_a_host_other_than_the_one_signed() -> None:
    """The check above has teeth: a request signed for ``127.0.0.1:80`` and received
    with ``Host: 127.0.0.1`` (what aiohttp sent before the fix) is refused."""
    from fileserver.storage.s3_put import SigV4Signer

    body = b"x"
    headers = SigV4Signer(REGION).sign(
        "PUT",
        "http://127.0.0.1:80/rec/k",
        {"Host": "127.0.0.1:80"},
        body,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    )
    received = {k.lower(): v for k, v in headers.items()}
    assert signature_ok(("PUT", "/rec/k", received, body))
    assert not signature_ok(("PUT", "/rec/k", {**received, "host": "127.0.0.1"}, body))


# ----------------------------------------------------------------------------- deadlines

CONNECT_S, READ_S = 0.5, 2.0  # the trickle (1 byte/s) never trips the read timeout alone
DEADLINE_S = CONNECT_S + READ_S


def deadline_settings(port: int, transport: str) -> Settings:
    return Settings(
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_region=REGION,
        s3_bucket=BUCKET,
        s3_transport=transport,
        connect_timeout_s=CONNECT_S,
        read_timeout_s=READ_S,
    )


# what bounds each case, as the error says it
SENDER_ERRORS = {
    (
        "aiohttp",
        "silent",
    ): r"SocketTimeoutError: no answer within 2 s \(FILESERVER_READ_TIMEOUT_S\)",
    ("aiohttp", "trickle"): r"TimeoutError: no answer within 2\.5 s \(FILESERVER_CONNECT_TIMEOUT_S "
    r"\+ FILESERVER_READ_TIMEOUT_S\)",
    ("http11", "silent"): r"RequestTimeout: no answer within 2\.5 s \(FILESERVER_CONNECT_TIMEOUT_S "
    r"\+ FILESERVER_READ_TIMEOUT_S\)",
    (
        "http11",
        "trickle",
    ): r"RequestTimeout: no answer within 2\.5 s \(FILESERVER_CONNECT_TIMEOUT_S "
    r"\+ FILESERVER_READ_TIMEOUT_S\)",
}


@pytest.mark.parametrize("mode", ["silent", "trickle"])
@pytest.mark.parametrize("transport", ["aiohttp", "http11"])
async def test_a_put_on_a_sender_has_a_deadline(transport: str, mode: str) -> None:
    async with fake_s3(mode) as s3:
        settings = deadline_settings(s3.port, transport)
        session = boto_session()
        putter = make_s3_putter(settings, make_s3_client(settings, session), session)
        try:
            with pytest.raises(DependencyUnavailable, match=SENDER_ERRORS[transport, mode]):
                await putter.put("k.mp3", b"abc", hashlib.md5(b"abc").hexdigest(), "a/b", {})
        finally:
            await putter.sender.aclose()
    assert len(s3.requests) == 1  # the whole request arrived; the answer never did
    # the error names the timeout that ended the call and its value: no wall-clock check


@asynccontextmanager
async def boto3_store(port: int, **kw: Any) -> AsyncIterator[ObjectStore]:
    """An ObjectStore on its own executor, shut down (stuck threads included, once the
    double hung up) after the test."""
    executor = ThreadPoolExecutor(4)
    client = make_s3_client(deadline_settings(port, "boto3"), boto_session())
    try:
        yield ObjectStore(client, BUCKET, executor, **kw)
    finally:
        with suppress(Exception):
            await asyncio.to_thread(executor.shutdown, wait=False, cancel_futures=True)


BOTO3_ERRORS = {
    "silent": r"ReadTimeoutError: .* \(FILESERVER_READ_TIMEOUT_S\)",
    "trickle": r"no complete answer within 2\.5\d* s \(FILESERVER_CONNECT_TIMEOUT_S \+ "
    r"FILESERVER_READ_TIMEOUT_S",
}


@pytest.mark.parametrize("mode", ["silent", "trickle"])
@pytest.mark.parametrize(
    "call", ["put_object", "multipart", "head_object", "head_bucket", "list_objects", "move"]
)
async def test_a_boto3_call_has_a_deadline(call: str, mode: str, tmp_path: Path) -> None:
    path = tmp_path / "big.mp3"
    path.write_bytes(b"\xff" * 1500)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    async with (
        fake_s3(mode) as s3,
        boto3_store(s3.port, multipart_threshold=1000, chunk_size=600) as store,
    ):
        with pytest.raises(DependencyUnavailable, match=BOTO3_ERRORS[mode]) as info:
            if call == "put_object":
                await store.put_file("k.mp3", b"abc", hashlib.md5(b"abc").hexdigest(), {})
            elif call == "multipart":
                await store.put_file("k.mp3", path, md5, {})
            elif call == "head_object":
                await store.head("k.mp3")
            elif call == "list_objects":
                [o async for o in store.list_objects()]
            elif call == "move":
                await store.move("k.mp3", "quarantine/k.mp3")
            else:
                await store.check_bucket()
        if call == "multipart":  # started, its first part hung, then aborted
            for _ in range(100):
                if any(m == "DELETE" for m, *_ in s3.requests):
                    break
                await asyncio.sleep(0.05)
            methods = [m for m, _t, _h, _b in s3.requests]
            targets = [t for _m, t, _h, _b in s3.requests]
            assert methods == ["POST", "PUT", "DELETE"], targets
            assert "partNumber=1" in targets[1] and "uploadId=upload-1" in targets[2]
    assert "s3:" in str(info.value)
    # the error names the timeout that ended the call and its value: no wall-clock check


@contextmanager
def unaccepting_port() -> Iterator[int]:
    """A port whose connections never complete: a listener with a full backlog (one
    connection waits, never accepted), so the kernel drops every further SYN."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


CONNECT_ERRORS = {
    "aiohttp": r"ConnectionTimeoutError: no answer within 0\.5 s \(FILESERVER_CONNECT_TIMEOUT_S\)",
    "http11": r"ConnectTimeout: connecting to http://127\.0\.0\.1:\d+ timed out after 0\.5 s "
    r"\(FILESERVER_CONNECT_TIMEOUT_S\)",
    "boto3": r"ConnectTimeoutError: .* \(FILESERVER_CONNECT_TIMEOUT_S\)",
}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_connection_that_never_opens_names_the_connect_timeout(transport: str) -> None:
    # the error names the connect timeout and its value: no wall-clock check
    with (
        unaccepting_port() as port,
        pytest.raises(DependencyUnavailable, match=CONNECT_ERRORS[transport]),
    ):
        await put_once(transport, deadline_settings(port, transport), b"abc")
