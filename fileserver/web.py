"""The worker's one small HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``.

``/metrics`` is prometheus_client's aiohttp handler over the worker's registry: the
Prometheus text format, or OpenMetrics for ``Accept: application/openmetrics-text``,
gzip-compressed when the request's ``Accept-Encoding`` allows it.

faust's own web server stays off; this aiohttp server listens on
``FILESERVER_METRICS_HOST``:``FILESERVER_METRICS_PORT``. The socket is bound before faust
starts (:meth:`Observability.bind`), so a port already in use stops the worker at
start-up naming the setting, and the server lives as long as the faust app (a mode
service). The agent :meth:`~Observability.attach`-es the running pipeline: the
readiness checks use its clients, the in-flight and lag gauges read its state.

* ``/healthz``: 200 while the process serves requests.
* ``/readyz``: 200 when the broker, the bucket and the database answer (checked at most
  every ``interval_s``, each check bounded by ``timeout_s``) and intake is not paused;
  503 with the reason otherwise. Both answer JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from faust import Service
from prometheus_client.aiohttp import make_aiohttp_handler

from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.metrics import LagSource, Metrics, get_metrics
from fileserver.settings import Settings

if TYPE_CHECKING:
    from fileserver.runtime import Runtime

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]


class HealthState(Protocol):
    """What readiness needs of :class:`fileserver.processor.Health`."""

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...


class WindowState(Protocol):
    """What the gauges need of :class:`fileserver.worker.IntakeWindow`."""

    @property
    def in_flight(self) -> int: ...

    @property
    def pending(self) -> int: ...


@dataclass(frozen=True)
class ReadyStatus:
    """The answer of ``/readyz``."""

    ready: bool
    reason: str | None
    checks: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "reason": self.reason, "checks": self.checks}


NOT_RUNNING = ReadyStatus(False, "the pipeline is not running (starting or stopping)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, DependencyUnavailable):  # the check's name already says which one
        text = text.removeprefix(f"{exc.dependency}: ")
    return text.splitlines()[0][:300]


class Readiness:
    """Dependency checks run at most every ``interval_s`` (shared by concurrent probes).

    They also run again as soon as intake pauses or resumes, so a paused worker's
    answer names the failing dependency rather than a cached "ok".
    """

    def __init__(
        self,
        checks: Mapping[str, Check],
        health: HealthState,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self._health = health
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._cached: dict[str, str] | None = None
        self._checked_at = 0.0
        self._health_at_check = health.ok
        self._lock = asyncio.Lock()

    async def _run(self, check: Check) -> str:
        try:
            async with asyncio.timeout(self._timeout_s):
                await check()
        except Exception as exc:
            return _describe(exc)
        return "ok"

    async def dependencies(self) -> dict[str, str]:
        """Each check's result (``"ok"`` or the error), cached for ``interval_s``."""
        async with self._lock:
            stale = self._clock() - self._checked_at >= self._interval_s
            if self._cached is None or stale or self._health.ok != self._health_at_check:
                self._health_at_check = self._health.ok
                names = list(self._checks)
                results = await asyncio.gather(*(self._run(self._checks[n]) for n in names))
                self._cached = dict(zip(names, results, strict=True))
                self._checked_at = self._clock()
            return dict(self._cached)

    async def status(self) -> ReadyStatus:
        """Ready when every dependency answers and intake is not paused."""
        checks = await self.dependencies()
        if self._health.ok:
            checks["intake"] = "ok"
        else:
            checks["intake"] = f"paused: {self._health.reason or 'a dependency failed'}"
        problems = [f"{name}: {result}" for name, result in checks.items() if result != "ok"]
        return ReadyStatus(not problems, "; ".join(problems) or None, checks)


def runtime_checks(runtime: Runtime) -> dict[str, Check]:
    """Readiness checks through the running pipeline's own clients."""
    producer = runtime.dead_letters._producer  # the dead-letter producer's broker client
    dlq_topic = runtime.dead_letters.topic

    async def kafka() -> None:
        if not await producer.client.force_metadata_update():
            raise ConnectionError(
                f"no broker of FILESERVER_KAFKA_BOOTSTRAP={runtime.settings.kafka_bootstrap} "
                "answered a metadata request"
            )
        if not producer.client.cluster.partitions_for_topic(dlq_topic):
            raise LookupError(f"the dead-letter topic {dlq_topic!r} has no partitions")

    return {"kafka": kafka, "s3": runtime.store.check_bucket, "postgres": runtime.repo.ping}


def faust_lag(consumer: Any) -> LagSource:
    """Lag per assigned partition from a faust consumer: end offset - committed offset.

    Before the group's first commit on a partition the lag is the end offset itself.
    """

    def rows() -> Iterable[tuple[str, int, int]]:
        committed: Mapping[Any, int | None] = consumer._committed_offset
        out: list[tuple[str, int, int]] = []
        for tp in sorted(consumer.assignment()):
            try:
                end = consumer.highwater(tp)
            except Exception:  # not assigned any more (rebalance in progress)
                continue
            if end is None:
                continue
            done = committed.get(tp) or 0
            out.append((tp.topic, tp.partition, max(0, int(end) - int(done))))
        return out

    return rows


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a :class:`ConfigError` naming the settings to fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise ConfigError(f"FILESERVER_METRICS_HOST={host!r} is not an address: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on FILESERVER_METRICS_HOST={host} FILESERVER_METRICS_PORT={port} "
            f"for /metrics, /healthz and /readyz: {exc.strerror or exc}"
        ) from None
    return sock


class WebServer:
    """aiohttp on an already bound socket, serving the metrics and the probes."""

    def __init__(self, metrics: Metrics, sock: socket.socket) -> None:
        self.metrics = metrics
        self.readiness: Readiness | None = None
        self._sock = sock
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def application(self) -> web.Application:
        app = web.Application()
        # prometheus_client's handler: Prometheus text, or OpenMetrics when the scraper's
        # Accept asks for it; gzip (aiohttp's compression) when Accept-Encoding allows it.
        app.router.add_get("/metrics", make_aiohttp_handler(self.metrics.registry))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        self._runner = runner
        host, port = self.address
        log.info("serving /metrics, /healthz and /readyz on %s:%s", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        status = NOT_RUNNING if self.readiness is None else await self.readiness.status()
        return web.Response(
            text=json.dumps(status.as_json()) + "\n",
            status=200 if status.ready else 503,
            content_type="application/json",
        )


class WebService(Service):
    """Runs a :class:`WebServer` for as long as the faust app runs."""

    def __init__(self, server: WebServer, **kwargs: Any) -> None:
        self._server = server
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self._server.start()

    async def on_stop(self) -> None:
        await self._server.stop()


class Observability:
    """What the worker wires: the server, the gauges and the readiness of its pipeline."""

    def __init__(
        self, metrics: Metrics, sock: socket.socket, *, ready_interval_s: float = 5.0
    ) -> None:
        self.metrics = metrics
        self.server = WebServer(metrics, sock)
        self._ready_interval_s = ready_interval_s

    @classmethod
    def bind(cls, settings: Settings, metrics: Metrics | None = None) -> Observability:
        """Bind ``FILESERVER_METRICS_HOST:PORT`` now (a busy port is a ``ConfigError``)."""
        sock = bind_listener(settings.metrics_host, settings.metrics_port)
        return cls(metrics or get_metrics(), sock)

    def service(self) -> WebService:
        """The mode service to add to the faust app."""
        return WebService(self.server)

    def attach(self, runtime: Runtime, window: WindowState, consumer: Any | None) -> None:
        """Report on a running pipeline (called by the agent once its runtime is open)."""
        self.metrics.watch_window(lambda: window.in_flight, lambda: window.pending)
        self.metrics.watch_lag(faust_lag(consumer) if consumer is not None else None)
        self.metrics.set_paused(not runtime.health.ok)
        runtime.health.add_listener(lambda ok: self.metrics.set_paused(not ok))
        self.server.readiness = Readiness(
            runtime_checks(runtime), runtime.health, interval_s=self._ready_interval_s
        )

    def detach(self) -> None:
        """The pipeline stopped: not ready, nothing in flight."""
        self.server.readiness = None
        self.metrics.unwatch_window()
        self.metrics.watch_lag(None)
