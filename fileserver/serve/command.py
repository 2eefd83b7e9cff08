"""``fileserver serve``: the verb, and the server's life (start, serve until SIGTERM/SIGINT)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from fileserver.db.reads import Reads
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.preflight import check_bucket
from fileserver.serve.app import ServeMetrics, Services, create_app
from fileserver.serve.audio import Presigner
from fileserver.serve.auth import TokenTable, new_token
from fileserver.settings import Settings, redact_url
from fileserver.storage import ObjectStore
from fileserver.web import Readiness

log = logging.getLogger("fileserver.serve")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fileserver serve``."""
    serve = sub.add_parser(
        "serve",
        help="serve the recordings: a read API (OpenAPI at /openapi.json) and a review page",
        description="Serve a read API over the recordings (lists by talk group, uid, time and "
        "emptiness; metadata; presigned or proxied audio with HTTP Range) and the review "
        "page /review, with /healthz, /readyz and /metrics. Bearer tokens are configured "
        "as SHA-256 hashes in FILESERVER_SERVE_TOKENS (see --new-token). A process of its "
        "own: the worker keeps ingesting.",
    )
    serve.add_argument(
        "--host", default=None, metavar="HOST", help="listen address (FILESERVER_SERVE_HOST)"
    )
    serve.add_argument(
        "--port", type=int, default=None, metavar="PORT", help="port (FILESERVER_SERVE_PORT)"
    )
    serve.add_argument(
        "--new-token",
        action="store_true",
        help="print a new random token and the FILESERVER_SERVE_TOKENS entry for it, and exit",
    )
    serve.set_defaults(func=run_command)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT."""
    if args.new_token:
        token, digest = new_token()
        print(f"token (give it to the client; it is not stored):  {token}")
        print(f"FILESERVER_SERVE_TOKENS entry (all scopes):        {digest}")
        print(f"the same, lists and metadata only:                 {digest}:read")
        return 0
    changes: dict[str, object] = {}
    if args.host is not None:
        changes["serve_host"] = args.host
    if args.port is not None:
        changes["serve_port"] = args.port
    if changes:
        settings = dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
        settings.validate()
    asyncio.run(serve_forever(settings))
    return 0


@dataclass
class Server:
    """A running server: where it listens."""

    host: str
    port: int
    services: Services

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


async def _preflight(settings: Settings, reads: Reads, store: ObjectStore) -> None:
    url = redact_url(settings.database_url)
    try:
        await reads.load_columns()
    except DependencyUnavailable as exc:
        raise ConfigError(
            f"cannot reach the database at FILESERVER_DATABASE_URL={url}: {exc.detail}"
        ) from None
    except LookupError as exc:
        raise ConfigError(f"{exc} (FILESERVER_DATABASE_URL={url})") from None
    await check_bucket(settings, store)


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, metrics: ServeMetrics | None = None
) -> AsyncIterator[Server]:
    """Start the server (preflight: tokens, database, bucket, port); stop it on exit."""
    from fileserver.runtime import open_serve_clients

    tokens = TokenTable.parse(settings.serve_tokens)
    if not tokens:
        raise ConfigError(
            "FILESERVER_SERVE_TOKENS is empty: configure at least one token's SHA-256 hash "
            "(`fileserver serve --new-token` prints one)"
        )
    async with open_serve_clients(settings) as clients:
        reads = Reads(clients.engine)
        await _preflight(settings, reads, clients.store)
        readiness = Readiness(
            {"postgres": reads.ping, "s3": clients.store.check_bucket},
            _AlwaysOk(),
            timeout_s=settings.connect_timeout_s + settings.read_timeout_s,
        )
        services = Services(
            reads=reads,
            presigner=Presigner(clients.s3_client, settings.serve_presign_ttl_s),
            http=clients.http,
            tokens=tokens,
            readiness=readiness,
            metrics=metrics or ServeMetrics(),
        )
        runner = web.AppRunner(create_app(services), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.serve_host, settings.serve_port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on FILESERVER_SERVE_HOST={settings.serve_host} "
                    f"FILESERVER_SERVE_PORT={settings.serve_port}: {exc.strerror or exc}"
                ) from None
            port = _bound_port(runner) or settings.serve_port
            server = Server(settings.serve_host, port, services)
            analysis = "with" if reads.has_empty else "without (before migration 0003)"
            log.info(
                "serving the API on %s (OpenAPI %s/openapi.json), the review page on %s/review; "
                "%s token(s), speech analysis columns: %s",
                server.url,
                server.url,
                server.url,
                len(tokens),
                analysis,
            )
            yield server
        finally:
            await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int | None:
    """The port the site listens on (the one chosen by the system for port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


class _AlwaysOk:
    """serve has no intake to pause: readiness is its dependencies alone."""

    ok = True
    reason = None


async def serve_forever(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serving(settings):
        await stop.wait()
        log.info("stopping: signal received")
