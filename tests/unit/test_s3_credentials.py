"""S3 credentials are read on the event loop and refreshed in a worker thread.

A refresh of IRSA / STS / instance-role credentials is a blocking HTTP call; the refresh
function here blocks on a :class:`threading.Event` instead and records the thread it ran
on, while a ticker task shows whether the loop kept running meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.credentials import (
    Credentials,
    DeferredRefreshableCredentials,
    RefreshableCredentials,
)

from fileserver.errors import DependencyUnavailable
from fileserver.storage.s3_put import FrozenCredentials, S3Putter


def now() -> datetime:
    return datetime.now(UTC)


class BlockingRefresh:
    """A refresh function that blocks until released and records where it ran."""

    def __init__(self, *, fail: bool = False) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[int] = []
        self.fail = fail

    def __call__(self) -> dict[str, str]:
        self.threads.append(threading.get_ident())
        self.started.set()
        assert self.release.wait(10), "the test never released the refresh"
        if self.fail:
            raise RuntimeError("STS said no")
        n = len(self.threads)
        return {
            "access_key": f"AK{n}",
            "secret_key": f"SK{n}",
            "token": f"TOKEN{n}",
            "expiry_time": (now() + timedelta(hours=1)).isoformat(),
        }


def expiring(refresh: Callable[[], dict[str, str]], in_s: float) -> RefreshableCredentials:
    return RefreshableCredentials(
        "AK0",
        "SK0",
        "TOKEN0",
        expiry_time=now() + timedelta(seconds=in_s),
        refresh_using=refresh,
        method="test",
        time_fetcher=now,
    )


class Ticker:
    """Counts how often the loop ran it: the loop is free while the count grows."""

    def __init__(self) -> None:
        self.ticks = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.ticks += 1

    def stop(self) -> None:
        self.task.cancel()


async def wait_started(refresh: BlockingRefresh) -> None:
    for _ in range(500):
        if refresh.started.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the refresh never started")


@pytest.mark.parametrize("window", ["advisory", "mandatory"])
async def test_refresh_runs_off_the_loop_once_for_concurrent_readers(window: str) -> None:
    refresh = BlockingRefresh()
    # botocore's windows: advisory under 15 min left, mandatory under 10 min
    creds = expiring(refresh, {"advisory": 12 * 60, "mandatory": 60}[window])
    cache = FrozenCredentials(creds)
    assert cache.refresh_due()
    ticker = Ticker()
    try:
        readers = [asyncio.create_task(cache.get()) for _ in range(5)]
        await wait_started(refresh)
        before = ticker.ticks
        await asyncio.sleep(0.2)  # the refresh is blocked all this time
        assert ticker.ticks - before >= 10, "the event loop stalled during the refresh"
        assert not any(r.done() for r in readers)
        refresh.release.set()
        got = await asyncio.gather(*readers)
    finally:
        refresh.release.set()
        ticker.stop()
    assert refresh.threads and threading.get_ident() not in refresh.threads
    assert len(refresh.threads) == 1  # one refresh shared by the five readers
    assert {(c.access_key, c.secret_key, c.token) for c in got} == {("AK1", "SK1", "TOKEN1")}
    assert not cache.refresh_due()
    assert (await cache.get()).access_key == "AK1" and len(refresh.threads) == 1


async def test_fresh_and_static_credentials_are_read_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_thread(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("no refresh due: no thread either")

    refresh = BlockingRefresh()
    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    fresh = FrozenCredentials(expiring(refresh, 3600))
    static = FrozenCredentials(Credentials("AK", "SK"))
    assert not fresh.refresh_due() and not static.refresh_due()
    assert (await fresh.get()).access_key == "AK0"
    assert (await static.get()).access_key == "AK"
    assert refresh.threads == []


async def test_refresh_is_due_just_before_botocores_own_check() -> None:
    """A few seconds before botocore would refresh inside get_frozen_credentials()
    (15 min left), the cache already hands it to a thread, so the loop never does it."""
    refresh = BlockingRefresh()
    refresh.release.set()
    creds = expiring(refresh, 15 * 60 + 2)
    assert not creds.refresh_needed()  # botocore: not yet
    cache = FrozenCredentials(creds)
    assert cache.refresh_due()
    await cache.get()
    assert threading.get_ident() not in refresh.threads


async def test_deferred_credentials_are_fetched_off_the_loop() -> None:
    refresh = BlockingRefresh()
    refresh.release.set()
    cache = FrozenCredentials(DeferredRefreshableCredentials(refresh, "test"))
    assert cache.refresh_due()
    assert (await cache.get()).access_key == "AK1"
    assert refresh.threads and threading.get_ident() not in refresh.threads


async def test_a_cancelled_reader_does_not_cancel_the_shared_refresh() -> None:
    refresh = BlockingRefresh()
    cache = FrozenCredentials(expiring(refresh, 60))
    first = asyncio.create_task(cache.get())
    second = asyncio.create_task(cache.get())
    await wait_started(refresh)
    first.cancel()
    await asyncio.sleep(0.05)
    refresh.release.set()
    assert (await second).access_key == "AK1"
    assert first.cancelled() and len(refresh.threads) == 1


class RecordingSender:
    """A sender that answers 200 and keeps the headers it was given."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.headers: list[dict[str, str]] = []

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        self.headers.append(headers)
        return 200, b""

    async def aclose(self) -> None:
        pass


def putter(sender: RecordingSender, credentials: Any) -> S3Putter:
    return S3Putter(
        sender,
        prefix="http://127.0.0.1:8333/b/",
        bucket="b",
        credentials=credentials,
        region="us-east-1",
    )


async def test_puts_wait_for_the_refresh_without_stalling_the_loop() -> None:
    refresh = BlockingRefresh()
    sender = RecordingSender()
    fast = putter(sender, expiring(refresh, 60))
    ticker = Ticker()
    try:
        puts = [
            asyncio.create_task(
                fast.put(f"k{i}", b"x", "9dd4e461268c8034f5c8564e155c67a6", "a", {})
            )
            for i in range(3)
        ]
        await wait_started(refresh)
        before = ticker.ticks
        await asyncio.sleep(0.1)
        assert ticker.ticks - before >= 5 and sender.headers == []
        refresh.release.set()
        await asyncio.gather(*puts)
    finally:
        refresh.release.set()
        ticker.stop()
    assert len(refresh.threads) == 1 and threading.get_ident() not in refresh.threads
    assert len(sender.headers) == 3
    for headers in sender.headers:
        assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AK1/")
        assert headers["x-amz-security-token"] == "TOKEN1"


async def test_a_refresh_slower_than_the_deadline_fails_the_put_not_the_next() -> None:
    refresh = BlockingRefresh()
    sender = RecordingSender(timeout_s=0.2)
    fast = putter(sender, expiring(refresh, 60))
    try:
        with pytest.raises(
            DependencyUnavailable,
            match=r"no answer within 0\.2 s \(FILESERVER_CONNECT_TIMEOUT_S \+ "
            r"FILESERVER_READ_TIMEOUT_S\)",
        ):
            await fast.put("k", b"x", "9dd4e461268c8034f5c8564e155c67a6", "a", {})
        refresh.release.set()
        await fast.put("k", b"x", "9dd4e461268c8034f5c8564e155c67a6", "a", {})
    finally:
        refresh.release.set()
    assert len(refresh.threads) == 1
    assert sender.headers[0]["x-amz-security-token"] == "TOKEN1"


async def test_a_failed_mandatory_refresh_is_a_dependency_error() -> None:
    refresh = BlockingRefresh(fail=True)
    refresh.release.set()
    fast = putter(RecordingSender(), expiring(refresh, 60))
    with pytest.raises(DependencyUnavailable, match=r"cannot refresh the S3 credentials.*STS said"):
        await fast.put("k", b"x", "9dd4e461268c8034f5c8564e155c67a6", "a", {})
    assert threading.get_ident() not in refresh.threads


async def test_no_credentials_is_a_dependency_error() -> None:
    fast = putter(RecordingSender(), None)
    with pytest.raises(DependencyUnavailable, match="no S3 credentials"):
        await fast.put("k", b"x", "9dd4e461268c8034f5c8564e155c67a6", "a", {})
