"""Downloading a recording: streamed into a temporary file while hashing.

Every hop (the URL, then each redirect, at most :data:`MAX_REDIRECTS`) is checked by the
:class:`~fileserver.sources.SourcePolicy`; its host name is resolved **once** by the
injected resolver, every address is checked, and the request goes to a checked address
(URL host rewritten to the IP, ``Host`` header and TLS SNI/verification on the original
name), so a DNS answer cannot change between check and connect. A recording of up to
``in_memory_max_bytes`` (default 1 MiB: every talk burst) is kept in memory while the
fetcher's :class:`MemoryBudget` (all downloads in flight together) has room; a larger one,
or one that finds the budget spent, is spooled to a temporary file. Enforces the size cap on
``Content-Length`` and on the bytes actually read, bounds the whole download (lookups
included) by a total timeout, and always removes the temporary file. ``/metrics`` reads
the budget in use when scraped and counts the downloads a spent budget sends to a file.
The request itself goes out on a wire (:mod:`fileserver.wires`: fileserver's http11 pool
by default, or aiohttp, or httpx), whose errors are translated here into the fileserver
error tree.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from time import time
from typing import BinaryIO
from urllib.parse import urljoin

import httpx

from fileserver.errors import ConfigError, PermanentError, Reason, SourceUnavailable
from fileserver.metrics import Metrics, get_metrics
from fileserver.resolve import Resolver, system_resolver
from fileserver.sources import (
    DEFAULT_PORTS,
    IPAddress,
    Source,
    SourcePolicy,
    display_url,
)
from fileserver.wires import HttpxWire, Wire, WireError, WireResponse

MAX_REDIRECTS = 5
IN_MEMORY_MAX_BYTES = 1024 * 1024
MEMORY_BUDGET_BYTES = 64 * 1024 * 1024
PER_SOURCE_LIMIT = 64
_RETRYABLE_STATUS = {408, 425, 429}
_REDIRECT_STATUS = {301, 302, 303, 307, 308}
_CONTENT_LENGTH = re.compile(r"[0-9]{1,30}")


@dataclass(frozen=True)
class Download:
    """A fetched recording: its bytes in memory (``data``) or in a temporary file (``path``)."""

    path: Path | None
    data: bytes | None
    size: int
    md5: str
    url: str

    @property
    def content(self) -> bytes | Path:
        """The bytes when in memory, else the temporary file."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path

    def read_bytes(self) -> bytes:
        """The whole recording (reads the file when it is on disk)."""
        content = self.content
        return content if isinstance(content, bytes) else content.read_bytes()


class _Slot:
    __slots__ = ("holding", "semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0  # holding or waiting
        self.holding = 0


class SourceSlots:
    """At most ``limit`` downloads at a time from one source (host and port), so a
    gateway never sees all ``FILESERVER_CONCURRENCY`` connections of a worker (no I/O).

    ``async with slots.hold(key):`` waits for a free slot of ``key``; a key's entry is
    dropped when nobody holds or waits for it, so the map stays as small as the set of
    sources in use.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a source needs at least one slot")
        self.limit = limit
        self._slots: dict[tuple[str, int], _Slot] = {}

    def hold(self, key: tuple[str, int]) -> _Held:
        """A context manager holding one slot of ``key`` while its block runs."""
        return _Held(self, key)

    def in_use(self, key: tuple[str, int]) -> int:
        """Downloads from ``key`` holding a slot now."""
        slot = self._slots.get(key)
        return 0 if slot is None else slot.holding

    def __len__(self) -> int:
        return len(self._slots)


class _Held:
    __slots__ = ("_key", "_owner", "_slot")

    def __init__(self, owner: SourceSlots, key: tuple[str, int]) -> None:
        self._owner = owner
        self._key = key
        self._slot: _Slot | None = None

    async def __aenter__(self) -> None:
        slots = self._owner._slots
        slot = slots.get(self._key)
        if slot is None:
            slot = slots[self._key] = _Slot(self._owner.limit)
        slot.users += 1
        self._slot = slot
        try:
            await slot.semaphore.acquire()
        except BaseException:  # cancelled while waiting: give the place back
            self._leave()
            raise
        slot.holding += 1

    async def __aexit__(self, *exc: object) -> None:
        assert self._slot is not None
        self._slot.holding -= 1
        self._slot.semaphore.release()
        self._leave()

    def _leave(self) -> None:
        assert self._slot is not None
        self._slot.users -= 1
        if self._slot.users == 0:
            del self._owner._slots[self._key]


class MemoryBudget:
    """Bytes of recordings all downloads together may hold in memory (no I/O).

    So memory stays bounded whatever ``FILESERVER_CONCURRENCY`` is: a download that
    finds the budget spent goes to a temporary file instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


class _Spool:
    """A download's sink: bytes in memory up to ``limit`` while ``budget`` has room,
    else a temporary file. ``on_budget_spill`` is called when the budget, not the
    limit, sends it to the file (as far as it can tell: see :meth:`expect`)."""

    def __init__(
        self,
        limit: int,
        tmp_dir: str | None,
        budget: MemoryBudget,
        on_budget_spill: Callable[[], None],
    ) -> None:
        self._limit = limit
        self._tmp_dir = tmp_dir
        self._budget = budget
        self._on_budget_spill = on_budget_spill
        self._count_budget_spill = True
        self._reserved = 0  # bytes of ``budget`` this download holds
        self.buffer: bytearray | None = bytearray()
        self.path: Path | None = None
        self._file: BinaryIO | None = None

    def expect(self, length: int | None) -> None:
        """The body's ``Content-Length``: above ``limit`` it goes to the file whatever the
        budget, so a budget refusing its first bytes is not a budget spill. Without one, a
        body that meets a spent budget before it passes ``limit`` counts as one."""
        if length is not None and length > self._limit:
            self._count_budget_spill = False

    def write(self, chunk: bytes) -> None:
        if self.buffer is not None:
            n = len(chunk)
            if len(self.buffer) + n <= self._limit:
                if self._budget.reserve(n):
                    self._reserved += n
                    self.buffer += chunk
                    return
                if self._count_budget_spill:
                    self._on_budget_spill()  # once: the buffer is gone after the spill
            self._spill()
        assert self._file is not None
        self._file.write(chunk)

    def _spill(self) -> None:
        fd, name = tempfile.mkstemp(prefix="fileserver-", suffix=".mp3", dir=self._tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        if self.buffer:
            self._file.write(self.buffer)
        self.buffer = None
        self._release()

    def take_bytes(self) -> bytes | None:
        """The recording when it stayed in memory (the budget stays held until
        :meth:`discard`)."""
        if self.buffer is None:
            return None
        data, self.buffer = bytes(self.buffer), None
        return data

    def _release(self) -> None:
        self._budget.release(self._reserved)
        self._reserved = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def discard(self) -> None:
        """Close and remove the temporary file, if any; give back the memory budget."""
        self.close()
        self._release()
        if self.path is not None:
            with suppress(FileNotFoundError):
                self.path.unlink()


SPOOL_PREFIX = "fileserver-spool-"


def _spool_owner() -> str:
    """``<host>-`` for this machine (or container): pids are only comparable on one."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{SPOOL_PREFIX}{host}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def prepare_spool_dir(base: str | None) -> tuple[Path, int]:
    """This process's empty directory for downloads too large for memory, under
    ``base`` (``FILESERVER_TMP_DIR``; default: the system's temporary directory).

    A worker killed with SIGKILL (or by the OOM killer) cannot remove its temporary
    files; the next process on the same host removes the directories of processes
    that no longer exist, and its own pid's (a container restarts with the same pid).
    Returns the directory and how many files were left over.
    """
    root = Path(base or tempfile.gettempdir())
    owner = _spool_owner()
    own = root / f"{owner}{os.getpid()}"
    left = 0
    try:
        root.mkdir(parents=True, exist_ok=True)
        for path in root.glob(f"{owner}*"):
            pid = path.name[len(owner) :]
            if pid.isdigit() and (path == own or not _alive(int(pid))):
                left += sum(1 for p in path.rglob("*") if not p.is_dir())
                shutil.rmtree(path, ignore_errors=True)
        own.mkdir(mode=0o700)
    except OSError as exc:
        raise ConfigError(
            f"cannot create a directory for downloads under FILESERVER_TMP_DIR={root}: "
            f"{exc.strerror or exc}"
        ) from None
    return own, left


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Hop:
    """One checked hop: where to connect and what to send there."""

    source: Source
    addresses: list[IPAddress]
    host_header: str
    sni_hostname: str | None

    def request_url(self, address: IPAddress) -> str:
        """The URL sent on the wire: built from the checked parts only (scheme, the
        checked address, port, path and query), so no other parser can read another
        target into it."""
        source = self.source
        host = f"[{address}]" if address.version == 6 else str(address)
        port = "" if source.port == DEFAULT_PORTS[source.scheme] else f":{source.port}"
        return f"{source.scheme}://{host}{port}{source.target}"


class Fetcher:
    """Fetches recordings on one shared wire (an :class:`httpx.AsyncClient` is wrapped in
    :class:`~fileserver.wires.HttpxWire`).

    ``resolver`` (default :func:`~fileserver.resolve.system_resolver`) is called once per
    hop whose host is a name; tests inject one mapping made-up names to addresses.
    ``metrics`` (default :func:`~fileserver.metrics.get_metrics`) reads :attr:`memory`
    when scraped and counts the downloads sent to a file because it was spent.
    ``per_source_limit``: downloads at a time from one host and port (:attr:`sources`);
    a download waits for a slot of each hop's source within its total timeout.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | Wire,
        policy: SourcePolicy,
        *,
        max_bytes: int,
        total_timeout_s: float,
        tmp_dir: str | None = None,
        resolver: Resolver | None = None,
        max_redirects: int = MAX_REDIRECTS,
        in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
        memory_budget_bytes: int = MEMORY_BUDGET_BYTES,
        per_source_limit: int = PER_SOURCE_LIMIT,
        metrics: Metrics | None = None,
    ) -> None:
        self._wire: Wire = HttpxWire(client) if isinstance(client, httpx.AsyncClient) else client
        self._in_memory_max = in_memory_max_bytes
        self.memory = MemoryBudget(memory_budget_bytes)
        self.sources = SourceSlots(per_source_limit)
        self._metrics = metrics or get_metrics()
        self._metrics.watch_memory(self.memory)
        self._policy = policy
        self._max_bytes = max_bytes
        self._total_timeout_s = total_timeout_s
        self._tmp_dir = tmp_dir
        self._resolver: Resolver = resolver or system_resolver
        self._max_redirects = max_redirects

    @asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Download]:
        """Download ``url``; a temporary file, if one was needed, is removed when the
        block exits."""
        spool = _Spool(
            self._in_memory_max, self._tmp_dir, self.memory, self._metrics.budget_spilled
        )
        try:
            try:
                async with asyncio.timeout(self._total_timeout_s):
                    size, md5, final_url = await self._fetch(url, spool)
            except TimeoutError:
                raise SourceUnavailable(
                    f"download took longer than FILESERVER_FETCH_TIMEOUT_S="
                    f"{self._total_timeout_s:g}s: {display_url(url)}"
                ) from None
            spool.close()
            data = spool.take_bytes()
            yield Download(path=spool.path, data=data, size=size, md5=md5, url=final_url)
        finally:
            spool.discard()

    async def _fetch(self, url: str, sink: _Spool) -> tuple[int, str, str]:
        current = url
        for _hop in range(self._max_redirects + 1):
            hop = await self._check_hop(current)
            try:
                # the source's slot is held until its response is closed
                async with self.sources.hold((hop.source.host, hop.source.port)):
                    resp = await self._send(hop)
                    try:
                        if resp.status in _REDIRECT_STATUS:
                            location = resp.header("location")
                            if not location:
                                raise SourceUnavailable(
                                    f"HTTP {resp.status} without Location: {display_url(current)}"
                                )
                            try:
                                current = urljoin(current, location)
                            except ValueError as exc:  # "http://[::1", a bracketed IPv4
                                raise PermanentError(
                                    Reason.SOURCE_UNAVAILABLE,
                                    f"HTTP {resp.status} to an invalid Location "
                                    f"{display_url(location)[:200]!r} ({exc}): "
                                    f"{display_url(current)}",
                                ) from None
                            continue
                        self._check_status(resp, current)
                        return await self._stream_body(resp, sink, current)
                    finally:
                        await resp.aclose()  # a redirect's or error's body is never read
            except WireError as exc:
                if exc.timeout:
                    raise SourceUnavailable(
                        f"timeout ({exc.kind}) from {display_url(current)}"
                    ) from None
                raise SourceUnavailable(
                    f"{exc.kind}: {display_url(exc.message)} ({display_url(current)})"
                ) from None
        raise PermanentError(
            Reason.SOURCE_FORBIDDEN,
            f"more than {self._max_redirects} redirects from {display_url(url)}",
        )

    async def _check_hop(self, url: str) -> _Hop:
        """Check ``url`` with the policy, resolve its host once, check every address."""
        source = self._policy.check(url)
        if source.address is not None:
            addresses = [source.address]
        else:
            try:
                resolved = await self._resolver(source.host, source.port)
            except (OSError, UnicodeError) as exc:
                raise SourceUnavailable(
                    f"cannot resolve {source.host}: {exc} ({display_url(url)})"
                ) from None
            addresses = self._policy.check_resolved(source, resolved)
        host = f"[{source.host}]" if ":" in source.host else source.host
        default_port = source.port == DEFAULT_PORTS[source.scheme]
        return _Hop(
            source=source,
            addresses=addresses,
            host_header=host if default_port else f"{host}:{source.port}",
            sni_hostname=source.host
            if source.scheme == "https" and source.address is None
            else None,
        )

    async def _send(self, hop: _Hop) -> WireResponse:
        """Send the GET to the first checked address that accepts a connection."""
        for i, address in enumerate(hop.addresses):
            try:
                return await self._wire.get(
                    hop.request_url(address),
                    host_header=hop.host_header,
                    sni_hostname=hop.sni_hostname,
                )
            except WireError as exc:
                if not exc.connect or i == len(hop.addresses) - 1:
                    raise
        raise AssertionError("check_resolved never returns an empty list")  # pragma: no cover

    def _check_status(self, resp: WireResponse, url: str) -> None:
        status = resp.status
        if status == 200:
            return
        where = display_url(url)
        if status in (404, 410):
            raise PermanentError(Reason.SOURCE_NOT_FOUND, f"HTTP {status} from {where}")
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise SourceUnavailable(
                f"HTTP {status} from {where}",
                retry_after=_retry_after(resp.header("retry-after")),
            )
        raise PermanentError(Reason.SOURCE_UNAVAILABLE, f"HTTP {status} from {where}")

    async def _stream_body(
        self, resp: WireResponse, sink: _Spool, url: str
    ) -> tuple[int, str, str]:
        header = (resp.header("content-length") or "").strip()
        length = int(header) if _CONTENT_LENGTH.fullmatch(header) else None
        if length is not None and length > self._max_bytes:
            raise PermanentError(
                Reason.TOO_LARGE,
                f"Content-Length {length} exceeds FILESERVER_MAX_FILE_BYTES={self._max_bytes}",
            )
        sink.expect(length)
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        write = sink.write
        async for chunk in resp.chunks():
            size += len(chunk)
            if size > self._max_bytes:
                raise PermanentError(
                    Reason.TOO_LARGE,
                    f"body exceeds FILESERVER_MAX_FILE_BYTES={self._max_bytes} bytes",
                )
            digest.update(chunk)
            write(chunk)
        if length is not None and length != size:
            raise SourceUnavailable(
                f"body ended after {size} of {length} bytes: {display_url(url)}"
            )
        return size, digest.hexdigest(), url
