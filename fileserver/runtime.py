"""The wiring layer: the only place that builds clients, pools and engines from settings."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import boto3
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from botocore.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fileserver.deadletter import KafkaDeadLetters
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.fetch import IN_MEMORY_MAX_BYTES, Fetcher, prepare_spool_dir
from fileserver.pipeline import Ingestor
from fileserver.preflight import check_stores
from fileserver.processor import DeadLetterLimit, Health, Processor
from fileserver.repository import Repository
from fileserver.resolve import system_resolver
from fileserver.settings import Settings, redact_url
from fileserver.sources import SourcePolicy
from fileserver.storage import ObjectStore, http11
from fileserver.storage.s3_put import (
    AiohttpSender,
    Http11Sender,
    S3Putter,
    Sender,
    environment_proxy,
    object_url_prefix,
)
from fileserver.wires import REQUEST_HEADERS, AiohttpWire, Http11Wire, HttpxWire, Wire

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a running pipeline needs, built once."""

    settings: Settings
    fetcher: Fetcher
    store: ObjectStore
    repo: Repository
    dead_letters: KafkaDeadLetters
    ingestor: Ingestor
    processor: Processor
    engine: AsyncEngine
    health: Health


def make_s3_client(settings: Settings, session: boto3.session.Session | None = None) -> Any:
    """A boto3 S3 client; retries are fileserver's own (see processor), not botocore's."""
    config = Config(
        max_pool_connections=max(10, settings.s3_threads),
        retries={"total_max_attempts": 1},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
        # Integrity is Content-MD5 on every PUT and part (storage.py): no extra CRC32 pass
        # over each body, no response checksum validation.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return (session or boto3.session.Session()).client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=config,
        verify=settings.s3_verify,  # True, False or a CA bundle path (FILESERVER_S3_VERIFY)
    )


def make_s3_putter(settings: Settings, client: Any, session: boto3.session.Session) -> S3Putter:
    """The event-loop PUT path of ``FILESERVER_S3_TRANSPORT=http11|aiohttp`` (its sender
    must be closed: ``putter.sender.aclose()``).

    Raises :class:`ConfigError` when a proxy from the environment applies to the bucket's
    endpoint: boto3 would go through it, the fast paths never do."""
    prefix = object_url_prefix(client, settings.s3_bucket)
    proxy = environment_proxy(client, prefix)
    if proxy is not None:
        scheme, host = urlsplit(prefix).scheme, urlsplit(prefix).hostname
        names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY")
        name = next((n for n in names if os.environ.get(n)), names[1])
        raise ConfigError(
            f"{name}={redact_url(proxy)} applies to the S3 endpoint {http11.origin_of(prefix)} "
            f"(NO_PROXY does not exempt it) but FILESERVER_S3_TRANSPORT={settings.s3_transport} "
            "connects directly, never through a proxy: set FILESERVER_S3_TRANSPORT=boto3 to "
            f"send through the proxy as botocore does, or add {host} to NO_PROXY if the store "
            "is reachable without it"
        )
    verify = settings.s3_verify
    ssl_context: ssl.SSLContext | None = None
    if isinstance(verify, str):
        ssl_context = ssl.create_default_context(cafile=verify)
    elif verify is False:
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    timeout_s = settings.connect_timeout_s + settings.read_timeout_s
    sender: Sender
    if settings.s3_transport == "http11":
        pool = http11.Pool(
            http11.origin_of(prefix),
            limit=settings.concurrency,
            connect_timeout_s=settings.connect_timeout_s,
            ssl_context=ssl_context,
        )
        sender = Http11Sender(pool, timeout_s=timeout_s)
    else:
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.concurrency, ssl=ssl_context if ssl_context else True
            ),
            timeout=aiohttp.ClientTimeout(
                sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
            ),
            trust_env=False,
            auto_decompress=False,
        )
        sender = AiohttpSender(http, timeout_s=timeout_s)
    return S3Putter.for_client(
        sender, client, settings.s3_bucket, credentials=session.get_credentials()
    )


def make_engine(settings: Settings) -> AsyncEngine:
    """The async SQLAlchemy engine (psycopg 3) with a pool sized for the concurrency.

    Connect timeout, TCP keepalives, ``statement_timeout`` and a bounded pool wait come
    from :func:`fileserver.repository.engine_options` (a silent link must not stall
    every insert for ~15 min)."""
    from fileserver.repository import engine_options

    return create_async_engine(
        settings.database_url,
        pool_size=min(20, max(2, settings.concurrency // 4)),
        max_overflow=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        **engine_options(
            settings.database_url,
            connect_timeout_s=settings.connect_timeout_s,
            statement_timeout_s=settings.db_statement_timeout_s,
        ),
    )


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The shared httpx client of ``FILESERVER_HTTP_TRANSPORT=httpx``: pooled, no
    redirects (the fetcher checks each hop), no cookies, no proxy from the environment."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            settings.read_timeout_s, connect=settings.connect_timeout_s, pool=None
        ),
        limits=httpx.Limits(
            max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
        ),
        headers=REQUEST_HEADERS,
        follow_redirects=False,
        trust_env=False,
        # sources cannot plant cookies in the shared client (memory, cross-event state)
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


def make_source_wire(settings: Settings) -> Wire:
    """The wire downloads go out on (``FILESERVER_HTTP_TRANSPORT``): http11 (the default:
    fileserver's HTTP/1.1 client on llhttp, about 0.6 of aiohttp's CPU per GET), aiohttp
    (a fraction of httpx's) or httpx (same checks on all three)."""
    if settings.http_transport == "http11":
        return Http11Wire(
            max_connections=settings.concurrency,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
        )
    if settings.http_transport == "aiohttp":
        return AiohttpWire(
            max_connections=settings.concurrency,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
        )
    return HttpxWire(make_http_client(settings))


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for the brokers (SSL / SASL_SSL), verifying their host names."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    context: ssl.SSLContext = create_ssl_context(
        cafile=settings.kafka_ssl_cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
        password=settings.kafka_ssl_key_password,
    )
    return context


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every aiokafka client fileserver builds."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [
            hp.strip() for hp in settings.kafka_bootstrap.split(",") if hp.strip()
        ],
        "security_protocol": settings.kafka_security_protocol,
    }
    context = kafka_ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password
    return kwargs


def faust_broker_credentials(settings: Settings) -> Any:
    """The same Kafka security options as faust ``broker_credentials`` (None: plaintext)."""
    import faust

    context = kafka_ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """The dead-letter producer: waits for all in-sync replicas."""
    return AIOKafkaProducer(
        **kafka_client_kwargs(settings),
        acks="all",
        client_id="fileserver-dlq",
        request_timeout_ms=30000,
    )


def make_reader(settings: Settings, *, client_id: str = "fileserver-backfill") -> AIOKafkaConsumer:
    """A group-less consumer (``assign`` + ``seek``): joins no group, commits nothing."""
    return AIOKafkaConsumer(
        **kafka_client_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=client_id,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        request_timeout_ms=30000,
    )


@asynccontextmanager
async def open_runtime(settings: Settings, *, hold: bool = True) -> AsyncIterator[Runtime]:
    """Build every client from ``settings``; close them all on exit.

    ``hold=False`` (backfill): the processor raises :class:`~fileserver.errors.BreakerOpen`
    where the worker would hold events behind an open dead-letter breaker."""
    if not settings.allowed_sources:
        raise ConfigError(
            "FILESERVER_ALLOWED_SOURCES is empty: list the gateways (host, host:port or CIDR) "
            "the worker may download recordings from"
        )
    policy = SourcePolicy(settings.allowed_sources)
    async with AsyncExitStack() as stack:
        spool, left_over = prepare_spool_dir(settings.tmp_dir)
        stack.callback(shutil.rmtree, spool, ignore_errors=True)
        if left_over:
            log.warning(
                "removed %s temporary download file(s) left by a worker that was killed",
                left_over,
            )
        wire = make_source_wire(settings)
        stack.push_async_callback(wire.aclose)
        # boto3 holds the GIL for most of a put: more threads than this only add
        # contention with the event loop (FILESERVER_S3_THREADS).
        executor = ThreadPoolExecutor(max_workers=settings.s3_threads, thread_name_prefix="s3")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        boto_session = boto3.session.Session()
        s3_client = make_s3_client(settings, boto_session)
        putter = None
        if settings.s3_transport != "boto3":
            putter = make_s3_putter(settings, s3_client, boto_session)
            stack.push_async_callback(putter.sender.aclose)
        store = ObjectStore(
            s3_client,
            settings.s3_bucket,
            executor,
            multipart_threshold=settings.multipart_threshold_bytes,
            chunk_size=settings.multipart_chunk_bytes,
            putter=putter,
        )
        engine = make_engine(settings)
        stack.push_async_callback(engine.dispose)
        repo = Repository(
            engine,
            batch_rows=settings.db_batch_rows,
            batch_linger_s=settings.db_batch_linger_ms / 1000,
        )
        stack.push_async_callback(repo.close)
        producer = make_producer(settings)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise DependencyUnavailable(
                "kafka",
                f"cannot reach FILESERVER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}: {exc}",
            ) from None
        stack.push_async_callback(producer.stop)
        dead_letters = KafkaDeadLetters(producer, settings.dlq_topic)
        fetcher = Fetcher(
            wire,
            policy,
            max_bytes=settings.max_file_bytes,
            total_timeout_s=settings.fetch_timeout_s,
            tmp_dir=str(spool),
            resolver=system_resolver,
            # kept in memory only what a single PUT may carry
            in_memory_max_bytes=min(IN_MEMORY_MAX_BYTES, settings.multipart_threshold_bytes),
            memory_budget_bytes=settings.download_memory_bytes,
            per_source_limit=settings.max_downloads_per_source,
        )
        ingestor = Ingestor.from_settings(fetcher, store, repo, settings)
        stack.push_async_callback(ingestor.analyzer.aclose)  # its child processes
        health = Health()
        processor = Processor(
            ingestor.ingest,
            repo,
            dead_letters,
            source_retry_s=settings.source_retry_s,
            internal_error_attempts=settings.internal_error_attempts,
            health=health,
            breaker=DeadLetterLimit(
                settings.dlq_max_consecutive,
                settings.dlq_breaker_cooldown_s,
                settings.dlq_breaker_max_hold_s,
            ),
            hold=hold,
        )
        yield Runtime(
            settings, fetcher, store, repo, dead_letters, ingestor, processor, engine, health
        )


async def preflight(runtime: Runtime) -> None:
    """Fail fast, naming the setting to fix, when the bucket or the database is unreachable
    or a signed PUT through the fast path is refused (:func:`fileserver.preflight.check_stores`,
    the checks reconcile runs too)."""
    s = runtime.settings
    await check_stores(s, runtime.repo, runtime.store)
    put = f", a signed PUT through {s.s3_transport}" if runtime.store.putter else ""
    log.info(
        "preflight ok: database, bucket %s%s and broker %s reachable",
        s.s3_bucket,
        put,
        s.kafka_bootstrap,
    )


@dataclass
class ServeClients:
    """What ``fileserver serve`` reads with: the database engine, the S3 client (for
    presigned URLs), an :class:`ObjectStore` (bucket check) and the aiohttp session its
    audio proxy fetches presigned URLs with."""

    engine: AsyncEngine
    s3_client: Any
    store: ObjectStore
    http: aiohttp.ClientSession


@asynccontextmanager
async def open_serve_clients(settings: Settings) -> AsyncIterator[ServeClients]:
    """Build ``fileserver serve``'s clients from ``settings``; close them all on exit."""
    async with AsyncExitStack() as stack:
        executor = ThreadPoolExecutor(max_workers=settings.s3_threads, thread_name_prefix="s3")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        # the worker's client, signing with SigV4 also in presigned URLs (boto3's default
        # there is still SigV2 for S3, which AWS refuses in most regions)
        session = boto3.session.Session()
        config = make_s3_client(settings, session).meta.config
        s3_client = session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=config.merge(Config(signature_version="s3v4")),
            verify=settings.s3_verify,
        )
        store = ObjectStore(s3_client, settings.s3_bucket, executor)
        engine = make_engine(settings)
        stack.push_async_callback(engine.dispose)
        ssl_context: ssl.SSLContext | bool = True
        if isinstance(settings.s3_verify, str):
            ssl_context = ssl.create_default_context(cafile=settings.s3_verify)
        elif settings.s3_verify is False:
            ssl_context = False
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency, ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(
                sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
            ),
            trust_env=False,
            auto_decompress=False,
        )
        stack.push_async_callback(http.close)
        yield ServeClients(engine, s3_client, store, http)
