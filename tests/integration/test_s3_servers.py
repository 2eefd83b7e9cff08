"""The S3Proxy and versitygw starters for real: fetched once, start, serve S3, stop, gone."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fileserver.devstack.servers import ManagedServer, port_open
from tests.servers.s3proxy import S3PROXY_VERSION, ensure_s3proxy_libs, start_s3proxy
from tests.servers.versitygw import VERSITYGW_VERSION, ensure_versitygw, start_versitygw


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("start", [start_s3proxy, start_versitygw], ids=["s3proxy", "versitygw"])
def test_server_serves_s3_then_stops_by_pid(
    start: Callable[[Path], ManagedServer], tmp_path: Path
) -> None:
    server: Any = start(tmp_path)
    try:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        s3 = server.client()
        s3.create_bucket(Bucket="starter-check")
        s3.put_object(Bucket="starter-check", Key="a/b.mp3", Body=b"abc", Metadata={"k": "v"})
        got = s3.get_object(Bucket="starter-check", Key="a/b.mp3")
        assert (got["Body"].read(), got["Metadata"]) == (b"abc", {"k": "v"})
        assert (server.data_dir / "starter-check").is_dir()  # the store is in the workdir
    finally:
        server.stop()
    pid = server.pid
    assert pid is not None and not server.is_running() and _gone(pid)
    assert not port_open(server.port)


def test_fetches_are_cached_and_pinned() -> None:
    libs = ensure_s3proxy_libs()
    assert (libs / f"s3proxy-{S3PROXY_VERSION}.jar").is_file()
    assert ensure_s3proxy_libs() == libs  # the second call finds the cache
    binary = ensure_versitygw()
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert f"v{VERSITYGW_VERSION}" in version
    assert ensure_versitygw() == binary
