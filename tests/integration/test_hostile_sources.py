"""Issue 6: what a hostile recording source (or a hostile record) can make the fetcher do.

Every test runs on every wire (``FILESERVER_HTTP_TRANSPORT``: httpx, aiohttp, http11). Real
servers listen on 127.0.0.1 and count every connection. Names (``gw.test``,
``evil.test``, ...) are answered by an injected resolver: nothing else can resolve
``*.test``, so a download that succeeds proves the request went to the address that was
looked up once and checked (DNS pinning), and a count of 0 connections proves that no
byte was sent to a refused source.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest

from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.fetch import MAX_REDIRECTS, Fetcher
from fileserver.resolve import static_resolver, system_resolver
from fileserver.runtime import make_http_client
from fileserver.settings import Settings
from fileserver.sources import IPAddress, SourcePolicy
from fileserver.wires import AiohttpWire, Http11Wire, HttpxWire, Wire, WireResponse

MAX_BYTES = 100_000

# A test-only CA and a certificate for gw.test it signed (EC P-256, valid 2000-2125).
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBbTCCARSgAwIBAgICEAAwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSZmlsZXNl
cnZlciB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjUwMTAxMDAwMDAwWjAd
MRswGQYDVQQDDBJmaWxlc2VydmVyIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASk58dbYOBtEu7YudV0cbh27lJfwmdmOExgTDK5D0eCTc9hFSY1kFKK
e9RBuOz7+NtT0EQqpzXCM/BMRhU6+W/9o0IwQDAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUb65vdczZTndgI6VepVyRPm+9vUwwCgYI
KoZIzj0EAwIDRwAwRAIgcu3pxyAtIpAaAhn3xDuUMO4JWsDkCQ23UQvBiLTP7b4C
IHK1aj/6spyqVNWYwL1hi+ED/ZQwVBUWr46K/toPrv9e
-----END CERTIFICATE-----
"""
GW_TEST_CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBrDCCAVKgAwIBAgICEAEwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSZmlsZXNl
cnZlciB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjUwMTAxMDAwMDAwWjAS
MRAwDgYDVQQDDAdndy50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEVtDo
9DbWjkshWmdWH42Pq041u7F88MASWMGUyr43TBQeZBrjTTcUey2ez5EyurHQw9gj
2rph6e4PvXXSIjhJk6OBijCBhzAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIH
gDATBgNVHSUEDDAKBggrBgEFBQcDATASBgNVHREECzAJggdndy50ZXN0MB0GA1Ud
DgQWBBSpZrWkTMT2WixJk2By0rusI4kACDAfBgNVHSMEGDAWgBRvrm91zNlOd2Aj
pV6lXJE+b729TDAKBggqhkjOPQQDAgNIADBFAiEAuM3MCDkLXrNUD8OgkuPavIoK
T0adiDlgLdMvY8Ago+ECIGTs1YPe2TZdVmmWpK+uLlr8T4siZSbdxS+gL6KmpMDF
-----END CERTIFICATE-----
"""
GW_TEST_KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMsCF8Aklo8gHhNxl
5ugz67gG2yud9iq0jdLefZn8mZahRANCAARW0Oj0NtaOSyFaZ1YfjY+rTjW7sXzw
wBJYwZTKvjdMFB5kGuNNNxR7LZ7PkTK6sdDD2CPaumHp7g+9ddIiOEmT
-----END PRIVATE KEY-----
"""


# --- a hostile server ------------------------------------------------------------------

Behaviour = Callable[[socket.socket], None]


@dataclass
class Request:
    path: str
    host: str | None
    sni: str | None
    cookie: str | None = None


@dataclass
class HostileServer:
    """A raw HTTP/1.1 server on 127.0.0.1 that counts connections and misbehaves on demand.

    ``routes`` maps a path to a behaviour writing the whole response to the socket;
    other paths get a 404. Every response ends the connection.
    """

    tls: ssl.SSLContext | None = None
    routes: dict[str, Behaviour] = field(default_factory=dict)
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _sni: dict[int, str | None] = field(default_factory=dict)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self) -> HostileServer:
        if self.tls is not None:
            self.tls.sni_callback = lambda sock, name, _ctx: self._sni.__setitem__(id(sock), name)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            lower = {k.strip().lower(): v.strip() for k, v in headers.items()}
            request = Request(path, lower.get("host"), self._sni.get(id(conn)), lower.get("cookie"))
            with self._lock:
                self.requests.append(request)
            self.routes.get(path, respond(404))(conn)
        except (OSError, ssl.SSLError):
            pass  # the client went away (that is the point of most behaviours)
        finally:
            conn.close()

    def hits(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)


def _head(status: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def respond(code: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        head = [*headers, ("Content-Length", str(len(body)))]
        conn.sendall(_head(f"{code} X", head) + body)

    return behaviour


def redirect(location: str) -> Behaviour:
    return respond(302, headers=[("Location", location)])


def endless_chunked(conn: socket.socket) -> None:
    conn.sendall(_head("200 OK", [("Transfer-Encoding", "chunked")]))
    chunk = b"4000\r\n" + b"z" * 0x4000 + b"\r\n"
    while True:  # until the client hangs up
        conn.sendall(chunk)


def endless_until_close(conn: socket.socket) -> None:
    conn.sendall(_head("200 OK", []))  # no length: the body runs until the server closes
    while True:
        conn.sendall(b"z" * 65536)


def lying_length(declared: int, then: str) -> Behaviour:
    """Declare ``declared`` bytes, then send fewer and close, or an endless chunked body."""

    def behaviour(conn: socket.socket) -> None:
        if then == "chunked":
            conn.sendall(_head("200 OK", [("Content-Length", str(declared))])[:-2])
            endless_chunked_tail(conn)
        elif then == "short":
            conn.sendall(_head("200 OK", [("Content-Length", str(declared))]) + b"z" * 10)
        else:
            conn.sendall(_head("200 OK", [("Content-Length", str(declared))]))
            while True:
                conn.sendall(b"z" * 65536)

    return behaviour


SMALL_LENGTH_THEN_CHUNKED = lying_length(1000, "chunked")


def endless_chunked_tail(conn: socket.socket) -> None:
    conn.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
    while True:
        conn.sendall(b"4000\r\n" + b"z" * 0x4000 + b"\r\n")


def endless_one_byte_chunks(conn: socket.socket) -> None:
    conn.sendall(_head("200 OK", [("Transfer-Encoding", "chunked")]))
    while True:  # five bytes of framing for each byte of body
        conn.sendall(b"1\r\nz\r\n" * 1000)


def endless(first: bytes, then: bytes) -> Behaviour:
    """``first``, then ``then`` again and again until the client hangs up."""

    def behaviour(conn: socket.socket) -> None:
        conn.sendall(first)
        while True:
            conn.sendall(then)

    return behaviour


CHUNKED_HEAD = _head("200 OK", [("Transfer-Encoding", "chunked")])


def drip(conn: socket.socket) -> None:
    conn.sendall(_head("200 OK", [("Content-Length", "50000")]))
    while True:  # one byte every 50 ms: never idle long enough for the read timeout
        conn.sendall(b"z")
        time.sleep(0.05)


def silent(conn: socket.socket) -> None:
    while conn.recv(1024):  # never answers; returns when the client hangs up
        pass


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[HostileServer]:
    srv = HostileServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def other() -> Iterator[HostileServer]:
    """A second server that must never be reached."""
    srv = HostileServer().start()
    yield srv
    srv.stop()


@dataclass
class Sent:
    """Every request the wire started (an httpx event hook or an aiohttp trace runs before
    any byte goes out, even before the connection is made)."""

    urls: list[str] = field(default_factory=list)


class RecordingHttp11Wire(Http11Wire):
    """The http11 wire, recording each URL before anything is sent (as the hooks do)."""

    def __init__(self, sent: Sent) -> None:
        super().__init__(max_connections=4, connect_timeout_s=2, read_timeout_s=2)
        self.sent = sent

    async def get(self, url: str, *, host_header: str, sni_hostname: str | None) -> WireResponse:
        self.sent.urls.append(url)
        return await super().get(url, host_header=host_header, sni_hostname=sni_hostname)


@pytest.fixture(params=["httpx", "aiohttp", "http11"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Wire, Sent]]:
    sent = Sent()
    settings = Settings(concurrency=4, connect_timeout_s=2, read_timeout_s=2)
    if request.param == "http11":
        recording = RecordingHttp11Wire(sent)
        try:
            yield recording, sent
        finally:
            await recording.aclose()
        return
    if request.param == "httpx":

        async def on_request(req: httpx.Request) -> None:
            sent.urls.append(str(req.url))

        async with make_http_client(settings) as http:
            http.event_hooks = {"request": [on_request], "response": []}
            yield HttpxWire(http), sent
        return

    async def on_start(_s: object, _c: object, params: aiohttp.TraceRequestStartParams) -> None:
        sent.urls.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    wire = AiohttpWire(
        max_connections=4, connect_timeout_s=2, read_timeout_s=2, trace_configs=[trace]
    )
    try:
        yield wire, sent
    finally:
        await wire.aclose()


class Resolver:
    """An injected resolver that records its calls; ``later`` answers the 2nd+ lookups."""

    def __init__(
        self, table: Mapping[str, Sequence[str]], later: Mapping[str, Sequence[str]] = {}
    ) -> None:
        self._first = static_resolver(table)
        self._later = static_resolver({**table, **later})
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.calls.append(host)
        resolve = self._first if self.calls.count(host) == 1 else self._later
        return await resolve(host, port)


def make_fetcher(
    http: Wire,
    allowed: list[str],
    tmp_path: Path,
    resolver: Resolver | None = None,
    *,
    total_timeout_s: float = 5,
    in_memory_max_bytes: int = 1024,
) -> Fetcher:
    return Fetcher(
        http,
        SourcePolicy(allowed),
        max_bytes=MAX_BYTES,
        total_timeout_s=total_timeout_s,
        tmp_dir=str(tmp_path),
        resolver=resolver or Resolver({"gw.test": ["127.0.0.1"]}),
        in_memory_max_bytes=in_memory_max_bytes,
    )


async def fetch(fetcher: Fetcher, url: str) -> tuple[bytes, str]:
    async with fetcher.download(url) as dl:
        return dl.read_bytes(), dl.url


async def refused(fetcher: Fetcher, url: str, reason: Reason = Reason.SOURCE_FORBIDDEN) -> str:
    with pytest.raises(PermanentError) as info:
        await fetch(fetcher, url)
    assert info.value.reason is reason
    return info.value.detail


Client = tuple[Wire, Sent]


# --- 1. source policy: refused before any byte is sent ------------------------------------


async def test_pinned_download_reaches_only_the_checked_address(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    resolver = Resolver({"gw.test": ["127.0.0.1"]})
    fetcher = make_fetcher(http, ["gw.test"], tmp_path, resolver)
    url = f"http://gw.test:{server.port}/a.mp3"
    body, final = await fetch(fetcher, url)
    assert (body, final) == (b"audio", url)
    assert resolver.calls == ["gw.test"]  # one lookup, and httpx made none (it cannot)
    assert sent.urls == [f"http://127.0.0.1:{server.port}/a.mp3"]
    assert server.requests == [server.requests[0]]
    assert server.requests[0].host == f"gw.test:{server.port}"  # virtual host kept


async def test_connection_falls_back_only_among_the_checked_addresses(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    """127.0.0.2 refuses the connection (the server listens on 127.0.0.1 only)."""
    http, sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    resolver = Resolver({"gw.test": ["127.0.0.2", "127.0.0.1"]})
    fetcher = make_fetcher(http, ["GW.Test"], tmp_path, resolver)
    body, _ = await fetch(fetcher, f"http://Gw.TEST.:{server.port}/a.mp3")
    assert body == b"audio"
    assert sent.urls == [
        f"http://127.0.0.2:{server.port}/a.mp3",
        f"http://127.0.0.1:{server.port}/a.mp3",
    ]
    assert resolver.calls == ["gw.test"] and server.connections == 1


async def test_dns_rebinding_cannot_swap_the_address_after_the_check(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, _sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    # first answer an allowed address, then the metadata address to every later lookup
    resolver = Resolver({"rebind.test": ["127.0.0.1"]}, later={"rebind.test": ["169.254.169.254"]})
    fetcher = make_fetcher(http, ["rebind.test"], tmp_path, resolver)
    url = f"http://rebind.test:{server.port}/a.mp3"
    assert (await fetch(fetcher, url))[0] == b"audio"
    assert resolver.calls == ["rebind.test"]  # the connection used the checked answer
    detail = await refused(fetcher, url)  # the next lookup is checked again
    assert "169.254.169.254" in detail
    assert server.connections == 1


@pytest.mark.parametrize(
    ("allowed", "url"),
    [
        # the metadata address itself, in several spellings, even when 0.0.0.0/0 is allowed
        (["0.0.0.0/0", "::/0"], "http://169.254.169.254/latest/meta-data/iam/"),
        (["0.0.0.0/0", "::/0"], "http://[::ffff:169.254.169.254]/latest/meta-data/"),
        (["0.0.0.0/0", "::/0"], "http://[fd00:ec2::254]/latest/meta-data/"),
        (["169.254.0.0/16"], "http://169.254.169.254/latest/meta-data/"),
        # schemes other than http(s)
        (["0.0.0.0/0"], "file:///etc/passwd"),
        (["0.0.0.0/0"], "ftp://127.0.0.1/a.mp3"),
        (["0.0.0.0/0"], "gopher://127.0.0.1:6379/_INFO"),
        # header / request smuggling through control characters in the URL
        (["0.0.0.0/0"], "http://127.0.0.1:6379/a\r\nSET x 1\r\n"),
        (["0.0.0.0/0"], "http://127.0.0.1:6379/a\x00b"),
    ],
)
async def test_unreachable_targets_are_refused_without_a_request(
    client: Client, tmp_path: Path, allowed: list[str], url: str
) -> None:
    http, sent = client
    resolver = Resolver({})
    await refused(make_fetcher(http, allowed, tmp_path, resolver), url)
    assert sent.urls == [] and resolver.calls == []
    assert list(tmp_path.iterdir()) == []


async def test_decimal_spelling_of_the_metadata_address_is_resolved_then_refused(
    client: Client, tmp_path: Path
) -> None:
    """``2852039166`` is 169.254.169.254: the real resolver says so, the check refuses it."""
    http, sent = client
    fetcher = Fetcher(
        http,
        SourcePolicy(["0.0.0.0/0"]),
        max_bytes=MAX_BYTES,
        total_timeout_s=5,
        tmp_dir=str(tmp_path),
        resolver=system_resolver,
    )
    detail = await refused(fetcher, "http://2852039166/latest/meta-data/")
    assert "169.254.169.254" in detail
    assert sent.urls == []


async def test_url_with_userinfo_is_refused_and_its_password_never_repeated(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    fetcher = make_fetcher(http, ["127.0.0.1", "gw.test"], tmp_path)
    for url in (
        f"http://admin:s3cr3tpass@127.0.0.1:{server.port}/a.mp3",
        f"http://admin@gw.test:{server.port}/a.mp3",
        f"http://gw.test:{server.port}@127.0.0.1:{server.port}/a.mp3",
    ):
        detail = await refused(fetcher, url)
        assert "credentials" in detail and "s3cr3tpass" not in detail
    assert server.connections == 0 and sent.urls == []


@pytest.mark.parametrize(
    ("allowed", "table"),
    [
        # an allowed name whose DNS answer is the metadata address
        (["evil.test"], {"evil.test": ["169.254.169.254"]}),
        # ... or mixes it with a reachable address (no "first good one" fallback)
        (["evil.test"], {"evil.test": ["127.0.0.1", "169.254.169.254"]}),
        (["evil.test"], {"evil.test": ["127.0.0.1", "::ffff:169.254.169.254"]}),
        # a CIDR entry allows a name only when every address is inside it
        (["127.0.0.0/8"], {"evil.test": ["127.0.0.1", "10.9.9.9"]}),
        (["0.0.0.0/0"], {"evil.test": ["127.0.0.1", "169.254.169.254"]}),
    ],
)
async def test_name_resolving_to_a_forbidden_address_is_refused_without_connecting(
    client: Client,
    server: HostileServer,
    tmp_path: Path,
    allowed: list[str],
    table: dict[str, Sequence[str]],
) -> None:
    http, sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    resolver = Resolver(dict(table))
    fetcher = make_fetcher(http, allowed, tmp_path, resolver)
    detail = await refused(fetcher, f"http://evil.test:{server.port}/a.mp3")
    assert "evil.test resolves to" in detail
    assert resolver.calls == ["evil.test"]
    assert server.connections == 0 and sent.urls == []


async def test_a_name_that_does_not_resolve_is_retryable_and_sends_nothing(
    client: Client, tmp_path: Path
) -> None:
    http, sent = client
    fetcher = make_fetcher(http, ["missing.test"], tmp_path, Resolver({}))
    with pytest.raises(SourceUnavailable, match=r"cannot resolve missing\.test"):
        await fetch(fetcher, "http://missing.test/a.mp3")
    assert sent.urls == []


async def test_port_not_listed_for_an_allowed_host_is_refused(
    client: Client, server: HostileServer, other: HostileServer, tmp_path: Path
) -> None:
    http, sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    other.routes["/a.mp3"] = respond(200, b"admin")
    resolver = Resolver({"gw.test": ["127.0.0.1"]})
    fetcher = make_fetcher(
        http, [f"gw.test:{server.port}", f"127.0.0.1:{server.port}"], tmp_path, resolver
    )
    assert (await fetch(fetcher, f"http://gw.test:{server.port}/a.mp3"))[0] == b"audio"
    for url in (
        f"http://gw.test:{other.port}/a.mp3",
        f"http://127.0.0.1:{other.port}/a.mp3",
        "http://gw.test/a.mp3",  # the default port is a port too
    ):
        assert "not in FILESERVER_ALLOWED_SOURCES" in await refused(fetcher, url)
    assert other.connections == 0
    assert resolver.calls == ["gw.test"]  # refused ports are refused before any lookup
    assert len(sent.urls) == 1


# --- redirects -----------------------------------------------------------------------------


async def test_redirects_to_forbidden_targets_are_refused_and_never_followed(
    client: Client, server: HostileServer, other: HostileServer, tmp_path: Path
) -> None:
    http, sent = client
    other.routes["/admin"] = respond(200, b"secret")
    targets = {
        "/to-other-port": f"http://gw.test:{other.port}/admin",
        "/to-other-ip": f"http://127.0.0.1:{other.port}/admin",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-evil-name": f"http://evil.test:{other.port}/admin",
        "/to-file": "file:///etc/passwd",
        "/to-userinfo": f"http://user:pw@gw.test:{server.port}/a.mp3",
        "/to-protocol-relative": f"//evil.test:{other.port}/admin",
    }
    for path, location in targets.items():
        server.routes[path] = redirect(location)
    resolver = Resolver({"gw.test": ["127.0.0.1"], "evil.test": ["169.254.169.254"]})
    fetcher = make_fetcher(http, [f"gw.test:{server.port}", "evil.test"], tmp_path, resolver)
    for path in targets:
        await refused(fetcher, f"http://gw.test:{server.port}{path}")
    assert other.connections == 0
    assert all(url.startswith(f"http://127.0.0.1:{server.port}/") for url in sent.urls)
    assert len(sent.urls) == len(targets)
    assert list(tmp_path.iterdir()) == []


async def test_redirect_to_another_allowed_host_is_resolved_and_pinned_again(
    client: Client, server: HostileServer, other: HostileServer, tmp_path: Path
) -> None:
    http, _sent = client
    server.routes["/moved.mp3"] = redirect(f"http://cdn.test:{other.port}/real.mp3")
    other.routes["/real.mp3"] = respond(200, b"audio")
    resolver = Resolver({"gw.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]})
    fetcher = make_fetcher(http, ["gw.test", f"cdn.test:{other.port}"], tmp_path, resolver)
    body, final = await fetch(fetcher, f"http://gw.test:{server.port}/moved.mp3")
    assert (body, final) == (b"audio", f"http://cdn.test:{other.port}/real.mp3")
    assert resolver.calls == ["gw.test", "cdn.test"]  # once per hop
    assert other.requests[0].host == f"cdn.test:{other.port}"


async def test_redirect_loop_stops_after_a_few_hops(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, _sent = client
    server.routes["/loop"] = redirect("/loop")
    fetcher = make_fetcher(http, ["gw.test"], tmp_path)
    detail = await refused(fetcher, f"http://gw.test:{server.port}/loop")
    assert f"more than {MAX_REDIRECTS} redirects" in detail
    assert server.hits("/loop") == MAX_REDIRECTS + 1
    assert list(tmp_path.iterdir()) == []


# --- 2. resource limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(endless_chunked, id="endless-chunked"),
        pytest.param(endless_until_close, id="endless-no-length"),
        pytest.param(SMALL_LENGTH_THEN_CHUNKED, id="small-length-then-endless-chunked"),
        pytest.param(lying_length(10**15, "endless"), id="huge-length"),
        pytest.param(endless_one_byte_chunks, id="endless-one-byte-chunks"),
    ],
)
async def test_endless_or_oversized_bodies_are_too_large(
    client: Client, server: HostileServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    """aiohttp refuses Transfer-Encoding next to Content-Length outright (h11 and llhttp
    through http11 read that body as chunked, so httpx and http11 end with
    ``too_large``): retryable ``source_unavailable`` there instead. Either way nothing is
    kept."""
    http, _sent = client
    server.routes["/a.mp3"] = behaviour
    fetcher = make_fetcher(http, ["gw.test"], tmp_path)
    url = f"http://gw.test:{server.port}/a.mp3"
    if isinstance(http, AiohttpWire) and behaviour is SMALL_LENGTH_THEN_CHUNKED:
        with pytest.raises(SourceUnavailable, match="Transfer-Encoding"):
            await fetch(fetcher, url)
    else:
        detail = await refused(fetcher, url, Reason.TOO_LARGE)
        assert "FILESERVER_MAX_FILE_BYTES" in detail
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [
        pytest.param(
            lying_length(5000, "short"), "without sending complete", id="shorter-than-length"
        ),
        pytest.param(lying_length(10**40, "endless"), "bad Content-Length", id="absurd-length"),
    ],
)
async def test_protocol_violations_are_retryable_and_leave_nothing(
    client: Client, server: HostileServer, tmp_path: Path, behaviour: Behaviour, why: str
) -> None:
    """A body that ends early or a malformed length: ``source_unavailable`` after retries."""
    http, _sent = client
    server.routes["/a.mp3"] = behaviour
    fetcher = make_fetcher(http, ["gw.test"], tmp_path)
    with pytest.raises(SourceUnavailable, match=why):
        await fetch(fetcher, f"http://gw.test:{server.port}/a.mp3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(endless(b"HTTP/1.1 200 OK\r\n", b"X-A: " + b"a" * 100 + b"\r\n"), id="head"),
        pytest.param(endless(b"HTTP/1.1 200 OK\r\nX-A: ", b"a" * 4096), id="header-line"),
        pytest.param(endless(b"HTTP/1.1 200 ", b"a" * 4096), id="status-line"),
        pytest.param(endless(b"", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"), id="1xx"),
        pytest.param(endless(CHUNKED_HEAD + b"4;a=", b"b" * 4096), id="chunk-extension"),
        pytest.param(endless(CHUNKED_HEAD, b"0" * 4096), id="chunk-size-zeros"),
        pytest.param(
            endless(CHUNKED_HEAD + b"1\r\nz\r\n0\r\n", b"X-T: " + b"t" * 100 + b"\r\n"),
            id="trailers",
        ),
    ],
)
async def test_endless_heads_and_framing_are_retryable_and_leave_nothing(
    client: Client, server: HostileServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    """A head, a chunk line or trailers that never end: ``source_unavailable``. http11
    refuses each after 64 KiB (``RemoteProtocolError``: head, or framing between two
    pieces of the body, over 65536 bytes); httpx (h11) after 100 KB except an endless
    series of 1xx responses, which it reads until the total timeout; aiohttp after
    8190 bytes of one line or too many headers, but it reads endless 1xx responses, an
    endless chunk extension and an endless chunk size of zeros until the total timeout
    (bounded in time, not refused)."""
    http, _sent = client
    server.routes["/a.mp3"] = behaviour
    fetcher = make_fetcher(http, ["gw.test"], tmp_path, total_timeout_s=1)
    with pytest.raises(SourceUnavailable) as info:
        await fetch(fetcher, f"http://gw.test:{server.port}/a.mp3")
    if isinstance(http, Http11Wire):
        assert "RemoteProtocolError" in str(info.value) and "over 65536 bytes" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("behaviour", [drip, silent], ids=["slow-drip", "silent"])
async def test_slow_servers_cannot_hold_a_slot_past_the_total_timeout(
    client: Client, server: HostileServer, tmp_path: Path, behaviour: Behaviour
) -> None:
    http, _sent = client
    server.routes["/a.mp3"] = behaviour
    fetcher = make_fetcher(http, ["gw.test"], tmp_path, total_timeout_s=1)
    with pytest.raises(SourceUnavailable, match="FILESERVER_FETCH_TIMEOUT_S=1s"):
        await fetch(fetcher, f"http://gw.test:{server.port}/a.mp3")
    assert list(tmp_path.iterdir()) == []


async def test_slow_name_lookup_counts_against_the_total_timeout(
    client: Client, tmp_path: Path
) -> None:
    http, sent = client

    async def hanging(host: str, port: int) -> Sequence[IPAddress]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fetcher = Fetcher(
        http,
        SourcePolicy(["gw.test"]),
        max_bytes=MAX_BYTES,
        total_timeout_s=0.5,
        tmp_dir=str(tmp_path),
        resolver=hanging,
    )
    with pytest.raises(SourceUnavailable, match="FILESERVER_FETCH_TIMEOUT_S"):
        await fetch(fetcher, "http://gw.test/a.mp3")
    assert sent.urls == []


async def test_the_file_is_removed_when_the_consumer_fails_too(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, _sent = client
    server.routes["/a.mp3"] = respond(200, b"audio")
    fetcher = make_fetcher(http, ["gw.test"], tmp_path, in_memory_max_bytes=0)
    with pytest.raises(RuntimeError):
        async with fetcher.download(f"http://gw.test:{server.port}/a.mp3") as dl:
            assert dl.path is not None and dl.path.exists()
            raise RuntimeError("probe failed")
    assert list(tmp_path.iterdir()) == []


async def test_sources_cannot_plant_cookies_in_the_shared_client(
    client: Client, server: HostileServer, tmp_path: Path
) -> None:
    http, _sent = client
    cookie = [("Set-Cookie", "session=planted; Path=/; Max-Age=99999")]
    server.routes["/a.mp3"] = respond(200, b"audio", headers=cookie)
    fetcher = make_fetcher(http, ["gw.test"], tmp_path)
    for _ in range(2):
        await fetch(fetcher, f"http://gw.test:{server.port}/a.mp3")
    assert [r.cookie for r in server.requests] == [None, None]
    if isinstance(http, HttpxWire):
        assert len(http.client.cookies.jar) == 0
    elif isinstance(http, AiohttpWire):
        assert http.session is not None
        assert len(http.session.cookie_jar) == 0
    # the http11 wire has no cookie jar: the requests above are the whole check


# --- TLS: SNI and certificate verification use the original name --------------------------


@pytest.fixture
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileServer]:
    certs = tmp_path_factory.mktemp("certs")
    (certs / "cert.pem").write_text(GW_TEST_CERT_PEM)
    (certs / "key.pem").write_text(GW_TEST_KEY_PEM)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    srv = HostileServer(tls=context).start()
    yield srv
    srv.stop()


def tls_wire(wire: str, verify: ssl.SSLContext | bool) -> Wire:
    if wire == "httpx":
        return HttpxWire(httpx.AsyncClient(verify=verify, trust_env=False))
    if wire == "aiohttp":
        return AiohttpWire(max_connections=4, connect_timeout_s=2, read_timeout_s=2, verify=verify)
    return Http11Wire(max_connections=4, connect_timeout_s=2, read_timeout_s=2, verify=verify)


@pytest.mark.parametrize("wire", ["httpx", "aiohttp", "http11"])
async def test_https_is_pinned_and_verified_against_the_original_name(
    tls_server: HostileServer, tmp_path: Path, wire: str
) -> None:
    tls_server.routes["/a.mp3"] = respond(200, b"secure audio")
    resolver = Resolver({"gw.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    verify = ssl.create_default_context(cadata=CA_PEM)
    http = tls_wire(wire, verify)
    try:
        fetcher = make_fetcher(http, ["gw.test", "other.test", "127.0.0.1"], tmp_path, resolver)
        url = f"https://gw.test:{tls_server.port}/a.mp3"
        body, _ = await fetch(fetcher, url)
        assert body == b"secure audio"
        request = tls_server.requests[0]
        assert (request.sni, request.host) == ("gw.test", f"gw.test:{tls_server.port}")
        # the certificate is for gw.test only: another name (or the bare IP) on the same
        # address fails verification, so the pinned IP never weakens TLS
        for bad in (
            f"https://other.test:{tls_server.port}/a.mp3",
            f"https://127.0.0.1:{tls_server.port}/a.mp3",
        ):
            with pytest.raises(SourceUnavailable, match="ConnectError"):
                await fetch(fetcher, bad)
    finally:
        await http.aclose()
    assert len(tls_server.requests) == 1
