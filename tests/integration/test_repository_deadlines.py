"""Deadlines of every Postgres call, against a real Postgres: the engine's connect
timeout, keepalives and ``statement_timeout``, the client-side deadline (a link that
goes silent), and kept batch connections that die or time out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fileserver.errors import DependencyUnavailable
from fileserver.migrate import upgrade
from fileserver.repository import Repository
from fileserver.runtime import make_engine
from fileserver.settings import Settings
from tests.helpers import count
from tests.integration.test_repository import _row

STALL_S = 300  # what each stalled statement would take without a deadline
ENDS_WITHIN_S = 30  # generous: the deadlines below are 1 s + 2 s margin (+ psycopg's 10 s)


class SilentLinkProxy:
    """A TCP forwarder to Postgres whose link can go silent: it stops passing bytes
    either way and closes nothing (no reset), as a dead route or a lost NAT entry does.
    Also ``cut()`` (close every connection) and ``refuse`` (close new ones at once)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # a blocked accept() would not see close()
        self.port = int(self._listener.getsockname()[1])
        self.silent = threading.Event()
        self.refuse = threading.Event()
        self._stopped = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.refuse.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            self._pairs.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._stopped.is_set():
                if self.silent.is_set():
                    self._stopped.wait(0.05)
                    continue
                ready, _w, _x = select.select([a, b], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        """End every connection now (the client sees it closed)."""
        for a, b in self._pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def migrated(database_url: str) -> str:
    upgrade(database_url)
    return database_url


@pytest.fixture
def proxy(migrated: str) -> Iterator[SilentLinkProxy]:
    url = make_url(migrated)
    link = SilentLinkProxy((str(url.host), int(url.port or 5432)))
    yield link
    link.close()


def _via(database_url: str, proxy: SilentLinkProxy) -> str:
    return make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)


def _settings(database_url: str, **changes: Any) -> Settings:
    return Settings(database_url=database_url, **({"connect_timeout_s": 2.0} | changes))


@pytest.fixture
async def fast_engine(migrated: str) -> AsyncIterator[AsyncEngine]:
    """An engine from ``make_engine`` with a 1 s statement timeout."""
    engine = make_engine(_settings(migrated, db_statement_timeout_s=1))
    yield engine
    await engine.dispose()


async def _backend_pid(repo: Repository, held: bool) -> int:
    rows = await repo._execute(
        text("SELECT pg_backend_pid()"), write=False, held=repo._insert_conn if held else None
    )
    return int(rows[0][0])


async def test_the_engine_from_settings_carries_connect_timeout_keepalives_and_statement_timeout(
    migrated: str,
) -> None:
    engine = make_engine(_settings(migrated, connect_timeout_s=3, db_statement_timeout_s=7))
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == "7s"
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            params = driver.info.get_parameters()
            assert params["connect_timeout"] == "3"
            assert params["keepalives"] == "1"
            assert int(params["keepalives_idle"]) >= 1
            assert int(params["keepalives_count"]) >= 1
            assert 0 < int(params["tcp_user_timeout"]) <= 60_000
            # and the socket itself has them
            with socket.socket(fileno=os.dup(driver.pgconn.socket)) as sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == int(
                    params["keepalives_idle"]
                )
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(
                    params["tcp_user_timeout"]
                )
        assert engine.pool.timeout() == 7  # type: ignore[attr-defined]
        assert Repository(engine)._deadline.timeout_s == 7
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("-c statement_timeout=4500 -c lock_timeout=2s", "4500ms"),
        ("-c lock_timeout=2s", "7s"),  # none in the URL: ours is added, theirs kept
        ("--statement-timeout=1min -c lock_timeout=2s", "1min"),
    ],
    ids=["theirs-wins", "ours-added", "long-form"],
)
async def test_options_in_the_database_url_are_kept(
    migrated: str, options: str, expected: str
) -> None:
    url = make_url(migrated).update_query_dict({"options": options})
    engine = make_engine(
        _settings(url.render_as_string(hide_password=False), db_statement_timeout_s=7)
    )
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == expected
            assert (await conn.execute(text("SHOW lock_timeout"))).scalar() == "2s"
        # the client-side deadline follows the server's timeout in force
        assert (
            Repository(engine)._deadline.timeout_s == {"4500ms": 4.5, "7s": 7, "1min": 60}[expected]
        )
    finally:
        await engine.dispose()


@pytest.mark.parametrize("held", [False, True], ids=["pooled", "held"])
async def test_a_statement_longer_than_the_statement_timeout_ends_and_the_next_works(
    fast_engine: AsyncEngine, held: bool
) -> None:
    repo = Repository(fast_engine, batch_rows=10)
    try:
        pid = await _backend_pid(repo, held)
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="FILESERVER_DB_STATEMENT_TIMEOUT_S"):
            await repo._execute(
                text(f"SELECT pg_sleep({STALL_S})"),
                write=False,
                held=repo._insert_conn if held else None,
            )
        assert time.monotonic() - started < ENDS_WITHIN_S
        await repo.ping()
        assert await repo.insert_recording(_row()) is True
        if held:  # the kept connection that timed out was dropped
            assert await _backend_pid(repo, held) != pid
    finally:
        await repo.close()


class _Lock:
    """Another session holding a lock the inserts of ``_row()`` wait for."""

    def __init__(self, database_url: str, kind: str) -> None:
        self._engine = create_engine(database_url)
        self._conn = self._engine.connect()
        if kind == "row":  # the same source_url, inserted and not committed yet
            self._conn.execute(
                text(
                    "INSERT INTO recordings (uid, grp_id, m_type, source_url, event_time, md5,"
                    " size_bytes, duration_ms, bitrate, sample_rate, channels, s3_bucket,"
                    " s3_key, kafka_topic, kafka_partition, kafka_offset) VALUES (1, 1, 'ptt',"
                    " :url, now(), :md5, 1, 1, 1, 1, 1, 'b', 'k', 't', 0, 99)"
                ),
                {"url": _row().source_url, "md5": "f" * 32},
            )
        else:
            self._conn.execute(text("LOCK TABLE recordings IN SHARE MODE"))

    def release(self) -> None:
        self._conn.rollback()
        self._conn.close()
        self._engine.dispose()


@pytest.mark.parametrize("kind", ["row", "table"])
@pytest.mark.parametrize("batch_rows", [0, 10], ids=["single", "batched"])
async def test_an_insert_blocked_on_a_lock_ends_and_the_next_works(
    fast_engine: AsyncEngine, migrated: str, kind: str, batch_rows: int
) -> None:
    repo = Repository(fast_engine, batch_rows=batch_rows)
    lock = _Lock(migrated, kind)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="FILESERVER_DB_STATEMENT_TIMEOUT_S"):
            await repo.insert_recording(_row())
        assert time.monotonic() - started < ENDS_WITHIN_S
    finally:
        lock.release()
    try:
        assert await repo.insert_recording(_row()) is True
        assert await repo.recording_md5(_row().source_url) == _row().md5
    finally:
        await repo.close()


@pytest.mark.parametrize("batch_rows", [0, 10], ids=["pooled", "held"])
async def test_a_silent_link_ends_at_the_client_deadline_and_the_connection_is_dropped(
    migrated: str, proxy: SilentLinkProxy, batch_rows: int
) -> None:
    """The server's statement_timeout cannot help: its answer never arrives. The call
    still ends (client-side deadline) and the connection never goes back to the pool."""
    engine = make_engine(_settings(_via(migrated, proxy), db_statement_timeout_s=1))
    invalidated: list[object] = []
    event.listen(engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
    repo = Repository(engine, batch_rows=batch_rows)
    try:
        assert await repo.insert_recording(_row("first")) is True
        proxy.silent.set()
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="FILESERVER_DB_STATEMENT_TIMEOUT_S"):
            await repo.insert_recording(_row("second"))
        assert time.monotonic() - started < ENDS_WITHIN_S
        assert invalidated
        proxy.silent.clear()
        # The INSERT sent into the silent link may still reach the server once the link
        # speaks again (it then reports the row as already there): safe to repeat.
        assert await repo.insert_recording(_row("second")) in (True, False)
        assert await repo.recording_md5(_row("second").source_url) == _row().md5
    finally:
        proxy.silent.clear()
        await repo.close()
        await engine.dispose()
    assert count(migrated, "recordings") == 2


async def test_a_kept_connection_that_cannot_be_replaced_fails_its_batch_at_once(
    migrated: str, proxy: SilentLinkProxy
) -> None:
    """The kept connection dies and no new one can be opened: the batch fails (an
    outage, retried by the processor) after one attempt at a new connection."""
    engine = create_async_engine(_via(migrated, proxy), connect_args={"connect_timeout": 2})
    repo = Repository(engine, batch_rows=10)
    try:
        assert await repo.insert_recording(_row("first")) is True
        proxy.refuse.set()
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="postgres"):
            await repo.insert_recording(_row("second"))
        assert time.monotonic() - started < ENDS_WITHIN_S
        proxy.refuse.clear()
        assert await repo.insert_recording(_row("second")) is True
    finally:
        await repo.close()
        await engine.dispose()


async def test_concurrent_batches_keep_working_while_one_statement_times_out(
    fast_engine: AsyncEngine,
) -> None:
    """A timed-out look-up batch does not disturb the insert batches (their own kept
    connection) nor the pool."""
    repo = Repository(fast_engine, batch_rows=10)
    try:
        stalled = asyncio.ensure_future(
            repo._execute(text(f"SELECT pg_sleep({STALL_S})"), write=False, held=repo._lookup_conn)
        )
        inserted = await asyncio.gather(
            *(repo.insert_recording(_row(f"http://h/{i}.mp3", i)) for i in range(20))
        )
        assert inserted == [True] * 20
        with pytest.raises(DependencyUnavailable):
            await asyncio.wait_for(stalled, ENDS_WITHIN_S)
        assert await repo.recording_md5("http://h/3.mp3") == _row().md5
    finally:
        await repo.close()
