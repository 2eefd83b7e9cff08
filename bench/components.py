"""CPU per download and per upload, each option beside its baseline.

``python -m bench.components [--n 3000]``

* download: :class:`~fileserver.fetch.Fetcher` on the httpx, aiohttp and http11 wires,
  beside a bare ``aiohttp`` GET (the floor), against the benchmark's aiohttp source server
  in its own process;
* upload: :class:`~fileserver.storage.ObjectStore` with boto3 (thread pool) and with the
  event-loop putter on each sender (``FILESERVER_S3_TRANSPORT=aiohttp``, ``http11``),
  against SeaweedFS, with the server's own CPU per PUT.

Each row: N operations at concurrency 32 after a warm-up, client CPU (this process) per
operation and operations/s. Keys have the production layout (nested "directories").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

CONCURRENCY = 32


async def _measure(n: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """(client µs of CPU per call, calls/s) of ``n`` calls, ``CONCURRENCY`` at a time."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> None:
        async with slots:
            await one(i)

    await asyncio.gather(*(bounded(-1 - i) for i in range(100)))  # warm-up
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    return (time.process_time() - cpu) / n * 1e6, n / (time.monotonic() - wall)


async def downloads(base: str, n: int) -> list[tuple[str, float, float]]:
    import aiohttp

    from fileserver.fetch import Fetcher
    from fileserver.runtime import make_source_wire
    from fileserver.settings import Settings
    from fileserver.sources import SourcePolicy

    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as s:

        async def bare(i: int) -> None:
            async with s.get(f"{base}/c/{i % 64}/x.mp3") as resp:
                await resp.read()

        rows.append(("bare aiohttp GET (floor)", *await _measure(n, bare)))
    for transport in ("httpx", "aiohttp", "http11"):
        wire = make_source_wire(Settings(http_transport=transport, concurrency=CONCURRENCY))
        fetcher = Fetcher(wire, SourcePolicy(["127.0.0.1"]), max_bytes=10**8, total_timeout_s=30)

        async def fetch(i: int, fetcher: Fetcher = fetcher) -> None:
            async with fetcher.download(f"{base}/c/{i % 64}/x.mp3"):
                pass

        try:
            rows.append((f"Fetcher, {transport} wire", *await _measure(n, fetch)))
        finally:
            await wire.aclose()
    return rows


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def uploads(s3: Any, n: int, body: bytes) -> list[tuple[str, float, float, float]]:
    import boto3

    from fileserver.runtime import make_s3_client, make_s3_putter
    from fileserver.settings import Settings
    from fileserver.storage import ObjectStore

    bucket = "bench-components"
    settings = Settings(
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
        s3_bucket=bucket,
        concurrency=CONCURRENCY,
    )
    session = boto3.session.Session(
        aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key
    )
    client = make_s3_client(settings, session)
    client.create_bucket(Bucket=bucket)
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    rows = []
    with ThreadPoolExecutor(8) as executor:
        for tag in ("boto3", "aiohttp", "http11"):
            fast = None
            if tag != "boto3":
                fast = make_s3_putter(replace(settings, s3_transport=tag), client, session)
            name = "ObjectStore, boto3 (8 threads)" if fast is None else f"ObjectStore, {tag}"
            store = ObjectStore(client, bucket, executor, putter=fast)

            async def put(i: int, store: ObjectStore = store, tag: str = tag) -> None:
                key = f"{i % 17}/{i % 500}/2019/09/27/{tag}-{i}-{md5}.mp3"
                await store.put_file(key, body, md5, {"md5": md5})

            server0 = _cpu_s(s3.pid)
            try:
                cpu_us, rate = await _measure(n, put)
            finally:
                if fast is not None:
                    await fast.sender.aclose()
            server_ms = (_cpu_s(s3.pid) - server0) * 1000 / (n + 100)
            rows.append((name, cpu_us, rate, server_ms))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.components", description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="operations per row")
    args = parser.parse_args(argv)

    from fileserver.devstack.samples import make_mp3
    from fileserver.devstack.servers import free_port, port_open, start_seaweedfs

    with tempfile.TemporaryDirectory(prefix="bench-components-") as tmp:
        clips = Path(tmp, "clips")
        clips.mkdir()
        for k in range(64):
            (clips / f"clip-{k:03d}.mp3").write_bytes(make_mp3(3.0, freq_hz=200 + 10 * k))
        port = free_port()
        source = subprocess.Popen(
            [sys.executable, "-m", "bench.sources", "--port", str(port), "--clips", str(clips)],
            stdin=subprocess.DEVNULL,
        )
        try:
            while not port_open(port):
                time.sleep(0.05)
            got = asyncio.run(downloads(f"http://127.0.0.1:{port}", args.n))
        finally:
            source.terminate()
            source.wait(10)
        print(f"download of a 3 s clip ({len(make_mp3(3.0))} bytes), concurrency {CONCURRENCY}")
        print(f"  {'':34}{'client µs CPU':>14}{'per s':>9}")
        for name, cpu_us, rate in got:
            print(f"  {name:34}{cpu_us:>14,.0f}{rate:>9,.0f}")
        with start_seaweedfs(Path(tmp, "seaweedfs")) as s3:
            put_rows = asyncio.run(uploads(s3, args.n, make_mp3(3.0)))
        print(f"upload of the same clip to SeaweedFS, concurrency {CONCURRENCY}")
        print(f"  {'':34}{'client µs CPU':>14}{'per s':>9}{'server ms CPU':>15}")
        for name, cpu_us, rate, server_ms in put_rows:
            print(f"  {name:34}{cpu_us:>14,.0f}{rate:>9,.0f}{server_ms:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
