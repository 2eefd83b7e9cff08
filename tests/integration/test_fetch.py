"""The Fetcher against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from fileserver.devstack.samples import SampleServer
from fileserver.errors import PermanentError, Reason, SourceUnavailable
from fileserver.fetch import Fetcher
from fileserver.runtime import make_http_client
from fileserver.settings import Settings
from fileserver.sources import SourcePolicy


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with make_http_client(Settings(concurrency=4, read_timeout_s=2)) as client:
        yield client


def fetcher(
    http: httpx.AsyncClient,
    tmp_path: Path,
    max_bytes: int = 1_000_000,
    in_memory_max_bytes: int = 64 * 1024,
) -> Fetcher:
    return Fetcher(
        http,
        SourcePolicy(["127.0.0.1"]),
        max_bytes=max_bytes,
        total_timeout_s=3,
        tmp_dir=str(tmp_path),
        in_memory_max_bytes=in_memory_max_bytes,
    )


def _status(code: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    def hook(req: BaseHTTPRequestHandler) -> bool:
        req.send_response(code)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    return hook


async def test_download_streams_to_a_temp_file_and_removes_it(
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer
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
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer, size: int
) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    sample_server.files["/a.mp3"] = data
    async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")) as dl:
        assert dl.data == data and dl.path is None and dl.content == data
        assert dl.size == size and dl.md5 == hashlib.md5(data).hexdigest()
        assert list(tmp_path.iterdir()) == []


async def test_a_recording_just_above_the_limit_is_spooled_whole_to_a_file(
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer
) -> None:
    data = bytes(range(256)) * 256 + b"!"  # 64 KiB + 1
    sample_server.files["/a.mp3"] = data
    async with fetcher(http, tmp_path).download(sample_server.url("/a.mp3")) as dl:
        assert dl.data is None and dl.path is not None and dl.path.read_bytes() == data
        assert dl.md5 == hashlib.md5(data).hexdigest()
    assert list(tmp_path.iterdir()) == []


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
    http: httpx.AsyncClient,
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
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer
) -> None:
    sample_server.files["/big.mp3"] = b"y" * 5000
    with pytest.raises(PermanentError) as info:
        async with fetcher(http, tmp_path, max_bytes=1000).download(sample_server.url("/big.mp3")):
            pass
    assert info.value.reason is Reason.TOO_LARGE

    def chunked(req: BaseHTTPRequestHandler) -> bool:  # no Content-Length, endless-ish body
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        for _ in range(100):
            req.wfile.write(b"400\r\n" + b"z" * 1024 + b"\r\n")
        req.wfile.write(b"0\r\n\r\n")
        return True

    sample_server.hooks.append(chunked)
    with pytest.raises(PermanentError) as info:
        async with fetcher(http, tmp_path, max_bytes=10_000).download(sample_server.url("/c.mp3")):
            pass
    assert info.value.reason is Reason.TOO_LARGE
    assert list(tmp_path.iterdir()) == []


async def test_redirects_are_rechecked(
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer
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
    http: httpx.AsyncClient, tmp_path: Path, sample_server: SampleServer
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


async def test_connection_refused_is_retryable(http: httpx.AsyncClient, tmp_path: Path) -> None:
    from fileserver.devstack.servers import free_port

    with pytest.raises(SourceUnavailable):
        async with fetcher(http, tmp_path).download(f"http://127.0.0.1:{free_port()}/a.mp3"):
            pass
