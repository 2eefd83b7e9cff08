"""The Fetcher against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from fileserver.devstack.samples import SampleServer
from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.fetch import Fetcher
from fileserver.metrics import Metrics
from fileserver.runtime import make_http_client, make_source_wire
from fileserver.settings import Settings
from fileserver.sources import SourcePolicy
from fileserver.wires import Wire


@pytest.fixture(params=["httpx", "aiohttp", "http11"])
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient | Wire]:
    """Each wire: the httpx client as the Fetcher takes it, the others as wires."""
    settings = Settings(concurrency=4, read_timeout_s=2, http_transport=request.param)
    if request.param == "httpx":
        async with make_http_client(settings) as client:
            yield client
        return
    wire = make_source_wire(settings)
    try:
        yield wire
    finally:
        await wire.aclose()


def fetcher(
    http: httpx.AsyncClient | Wire,
    tmp_path: Path,
    max_bytes: int = 1_000_000,
    in_memory_max_bytes: int = 64 * 1024,
    memory_budget_bytes: int = 1024 * 1024,
    metrics: Metrics | None = None,
) -> Fetcher:
    return Fetcher(
        http,
        SourcePolicy(["127.0.0.1"]),
        max_bytes=max_bytes,
        total_timeout_s=3,
        tmp_dir=str(tmp_path),
        in_memory_max_bytes=in_memory_max_bytes,
        memory_budget_bytes=memory_budget_bytes,
        metrics=metrics,
    )


def memory_gauge(m: Metrics) -> float | None:
    return m.registry.get_sample_value("fileserver_download_memory_bytes")


def budget_spills(m: Metrics) -> float | None:
    return m.registry.get_sample_value("fileserver_download_spills_total")


def _status(code: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    def hook(req: BaseHTTPRequestHandler) -> bool:
        req.send_response(code)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    return hook


def _chunked(kib: int):  # type: ignore[no-untyped-def]
    """A hook answering every request with ``kib`` KiB, chunked (no Content-Length)."""

    def hook(req: BaseHTTPRequestHandler) -> bool:
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        for _ in range(kib):
            req.wfile.write(b"400\r\n" + b"z" * 1024 + b"\r\n")
        req.wfile.write(b"0\r\n\r\n")
        return True

    return hook


async def test_download_streams_to_a_temp_file_and_removes_it(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    data = b"x" * 200_000
    sample_server.files["/a.mp3"] = data
    async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")) as dl:
        assert dl.read_bytes() == data
        assert dl.size == len(data) and dl.md5 == hashlib.md5(data).hexdigest()
        assert dl.data is None and dl.path is not None  # above the in-memory limit
        assert dl.path.read_bytes() == data and dl.content == dl.path
        path = dl.path
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 64 * 1024])
async def test_a_recording_up_to_the_in_memory_limit_never_touches_the_disk(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer, size: int
) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    sample_server.files["/a.mp3"] = data
    async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")) as dl:
        assert dl.data == data and dl.path is None and dl.content == data
        assert dl.size == size and dl.md5 == hashlib.md5(data).hexdigest()
        assert list(tmp_path.iterdir()) == []


async def test_a_recording_just_above_the_limit_is_spooled_whole_to_a_file(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    data = bytes(range(256)) * 256 + b"!"  # 64 KiB + 1
    sample_server.files["/a.mp3"] = data
    async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")) as dl:
        assert dl.data is None and dl.path is not None and dl.path.read_bytes() == data
        assert dl.md5 == hashlib.md5(data).hexdigest()
    assert list(tmp_path.iterdir()) == []


async def test_downloads_in_flight_together_stay_within_the_memory_budget(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    """Room for one recording in memory: the second one open at the same time goes to a
    file, whole and intact; the budget is given back when each download ends."""
    first, second = b"a" * 40_000, b"b" * 40_000
    sample_server.files["/1.mp3"], sample_server.files["/2.mp3"] = first, second
    f = fetcher(http, tmp_path, memory_budget_bytes=50_000)
    async with f.download(sample_server.url("/1.mp3")) as one:
        assert one.data == first and one.path is None
        assert f.memory.held == len(first)
        async with f.download(sample_server.url("/2.mp3")) as two:
            assert two.data is None and two.path is not None
            assert two.path.read_bytes() == second
            assert two.md5 == hashlib.md5(second).hexdigest()
            assert f.memory.held == len(first)  # the spilled bytes were given back
        assert f.memory.held == len(first)
    assert f.memory.held == 0
    async with f.download(sample_server.url("/2.mp3")) as again:  # room again
        assert again.data == second and again.path is None
    assert f.memory.held == 0 and list(tmp_path.iterdir()) == []


async def test_the_memory_gauge_follows_the_budget_and_budget_spills_are_counted(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    """The gauge reads the bytes held by downloads open right now; only a download the
    spent budget sends to a file is counted, not one larger than the in-memory limit."""
    first, second = b"a" * 40_000, b"b" * 40_000
    sample_server.files["/1.mp3"], sample_server.files["/2.mp3"] = first, second
    sample_server.files["/big.mp3"] = b"c" * 200_000  # above the 64 KiB in-memory limit
    m = Metrics(process=False)
    f = fetcher(http, tmp_path, memory_budget_bytes=50_000, metrics=m)
    assert (memory_gauge(m), budget_spills(m)) == (0, 0)
    async with f.download(sample_server.url("/1.mp3")) as one:
        assert one.path is None
        assert memory_gauge(m) == len(first)
        async with f.download(sample_server.url("/2.mp3")) as two:
            assert two.path is not None  # the budget is spent
            assert (memory_gauge(m), budget_spills(m)) == (len(first), 1)
        async with f.download(sample_server.url("/big.mp3")) as big:
            assert big.path is not None  # too large for memory, budget or not
        assert (memory_gauge(m), budget_spills(m)) == (len(first), 1)
    assert (memory_gauge(m), budget_spills(m)) == (0, 1)
    async with f.download(sample_server.url("/2.mp3")) as again:  # room again
        assert again.path is None and memory_gauge(m) == len(second)
    async with f.download(sample_server.url("/big.mp3")) as big:  # alone: still the limit
        assert big.path is not None
    assert (memory_gauge(m), budget_spills(m)) == (0, 1)
    assert b"fileserver_download_memory_bytes 0.0" in m.render()[0]


async def test_the_memory_gauge_is_back_to_zero_after_a_failed_download(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    sample_server.hooks.append(_chunked(30))  # no Content-Length: read, then refused
    m = Metrics(process=False)
    f = fetcher(http, tmp_path, max_bytes=20_000, metrics=m)
    with pytest.raises(PermanentError):
        async with f.download(sample_server.url("/c.mp3")):
            pass
    assert (memory_gauge(m), budget_spills(m)) == (0, 0)


async def test_a_download_failing_midway_gives_back_its_memory_budget(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    sample_server.hooks.append(_chunked(30))  # no Content-Length: read, then refused
    f = fetcher(http, tmp_path, max_bytes=20_000)
    with pytest.raises(PermanentError) as info:
        async with f.download(sample_server.url("/c.mp3")):
            pass
    assert info.value.reason is Reason.TOO_LARGE
    assert f.memory.held == 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "error", "reason"),
    [
        (404, PermanentError, Reason.SOURCE_NOT_FOUND),
        (410, PermanentError, Reason.SOURCE_NOT_FOUND),
        (403, PermanentError, Reason.SOURCE_UNAVAILABLE),
        (503, SourceUnavailable, None),
        (429, SourceUnavailable, None),
    ],
)
async def test_status_codes(
    http: httpx.AsyncClient | Wire,
    tmp_path: Path,
    sample_server: SampleServer,
    code: int,
    error: type[Exception],
    reason: Reason | None,
) -> None:
    sample_server.hooks.append(_status(code, {"Retry-After": "7"}))
    with pytest.raises(error) as info:
        async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")):
            pass
    if reason is not None:
        assert info.value.reason is reason  # type: ignore[attr-defined]
    else:
        assert info.value.retry_after == 7  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


async def test_too_large_by_content_length_and_by_bytes(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    sample_server.files["/big.mp3"] = b"y" * 5000
    with pytest.raises(PermanentError) as info:
        async with fetcher(http, tmp_path, max_bytes=1000).download(sample_server.url("/big.mp3")):
            pass
    assert info.value.reason is Reason.TOO_LARGE

    sample_server.hooks.append(_chunked(100))  # no Content-Length, endless-ish body
    with pytest.raises(PermanentError) as info:
        async with fetcher(http, tmp_path, max_bytes=10_000).download(sample_server.url("/c.mp3")):
            pass
    assert info.value.reason is Reason.TOO_LARGE
    assert list(tmp_path.iterdir()) == []


async def test_redirects_are_rechecked(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    sample_server.files["/real.mp3"] = b"audio"

    def redirect(req: BaseHTTPRequestHandler) -> bool:
        targets = {"/moved.mp3": "/real.mp3", "/evil.mp3": "http://169.254.169.254/latest/"}
        if req.path in targets:
            req.send_response(302)
            req.send_header("Location", targets[req.path])
            req.send_header("Content-Length", "0")
            req.end_headers()
            return True
        return False

    sample_server.hooks.append(redirect)
    async with fetcher(http, tmp_path).download(sample_server.url("/moved.mp3")) as dl:
        assert dl.read_bytes() == b"audio"
    with pytest.raises(PermanentError) as info:
        async with fetcher(http, tmp_path).download(sample_server.url("/evil.mp3")):
            pass
    assert info.value.reason is Reason.SOURCE_FORBIDDEN


async def test_slow_server_is_bounded_by_the_total_timeout(
    http: httpx.AsyncClient | Wire, tmp_path: Path, sample_server: SampleServer
) -> None:
    def drip(req: BaseHTTPRequestHandler) -> bool:
        req.send_response(200)
        req.send_header("Content-Length", "100")
        req.end_headers()
        for _ in range(100):
            req.wfile.write(b"a")
            req.wfile.flush()
            time.sleep(0.1)
        return True

    sample_server.hooks.append(drip)
    with pytest.raises(SourceUnavailable, match="FILESERVER_FETCH_TIMEOUT_S"):
        async with fetcher(http, tmp_path).download(sample_server.url("/slow.mp3")):
            pass


async def test_connection_refused_is_retryable(
    http: httpx.AsyncClient | Wire, tmp_path: Path
) -> None:
    from fileserver.devstack.servers import free_port

    with pytest.raises(SourceUnavailable):
        async with fetcher(http, tmp_path).download(f"http://127.0.0.1:{free_port()}/a.mp3"):
            pass


@pytest.mark.parametrize("transport", ["httpx", "aiohttp", "http11"])
async def test_downloads_from_one_source_stay_within_its_limit(
    tmp_path: Path, sample_server: SampleServer, transport: str
) -> None:
    """FILESERVER_MAX_DOWNLOADS_PER_SOURCE: 8 downloads at once from one gateway with a
    limit of 3: the gateway never serves more than 3 at a time, and all 8 complete."""
    lock = threading.Lock()
    now, peak = [0], [0]

    def slow(req: BaseHTTPRequestHandler) -> bool:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.5)
        with lock:
            now[0] -= 1
        return False  # then served as usual

    sample_server.hooks.append(slow)
    for i in range(8):
        sample_server.files[f"/{i}.mp3"] = bytes([i]) * 1000
    wire = make_source_wire(Settings(http_transport=transport, concurrency=16))
    f = Fetcher(
        wire,
        SourcePolicy(["127.0.0.1"]),
        max_bytes=10**6,
        total_timeout_s=20,
        tmp_dir=str(tmp_path),
        per_source_limit=3,
    )

    async def one(i: int) -> None:
        async with f.download(sample_server.url(f"/{i}.mp3")) as d:
            assert d.data == bytes([i]) * 1000

    try:
        await asyncio.gather(*(one(i) for i in range(8)))
    finally:
        await wire.aclose()
    assert peak[0] == 3
    assert sum(sample_server.hits.values()) == 8
    assert len(f.sources) == 0
